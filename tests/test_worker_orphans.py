"""Nothing outlives `kiln serve`, even a `kill -9` of it: its local workers get SIGTERM from the
kernel (PR_SET_PDEATHSIG), drain, exit and remove the ready-file folder it could not remove
itself (the last one out); a folder left by workers that were killed too is removed by the next
start of local workers (it is named after its owner's pid). Real processes; synchronised on /proc
and the log."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from tests._server import serve_process
from tests._workers import start_workers, wait_for


def running(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its new parent to reap it does not run)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in "ZX"


def test_after_kill_9_of_kiln_serve_its_workers_exit_and_leave_no_folder(tiny_package, tmp_path):
    live = serve_process(tiny_package("sd1"), tmp_path)
    try:
        owner = live.proc.pid
        workers = live.worker_pids()
        (folder,) = Path(tempfile.gettempdir()).glob(f"kiln-workers-{owner}-*")

        os.kill(owner, signal.SIGKILL)
        live.proc.wait()
        assert wait_for(lambda: not any(running(pid) for pid in workers), 60), "a worker outlived kiln serve"
        assert "worker stopped" in live.log.read_text(), "the worker should drain and stop on SIGTERM, not be killed"
        assert not folder.exists(), "the last worker out removes the ready-file folder"
    finally:
        live.stop()


def test_a_folder_left_by_killed_workers_is_removed_by_the_next_start(tiny_package):
    dead_owner = os.getpid() + 4_000_000  # above any pid Linux hands out (pid_max is at most 2^22)
    folder = Path(tempfile.mkdtemp(prefix=f"kiln-workers-{dead_owner}-"))
    (folder / "worker-0.ready").write_text("127.0.0.1:1\n")
    start_workers(tiny_package("sd1")).stop()
    assert not folder.exists()
