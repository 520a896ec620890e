"""LocalWorkers: start `kiln worker` processes on this machine (one per device) and stop them.

    with LocalWorkers(["build/kiln-shapes/cpu"], count=2) as workers:
        pool = WorkerPool(workers.addresses)

Each worker listens on a free loopback port it picks itself (`--listen 127.0.0.1:0`) and writes
its address to a ready file once loaded and warmed up, so there is no race for ports. On Linux a
worker gets SIGTERM if the process that started it dies, so none is left orphaned.

The ready files live in a temporary folder named after this process's pid
(`kiln-workers-<pid>-*`), removed by stop(); a start removes the folders of owners that are no
longer running, so even a `kill -9` leaves at most one folder, until the next start.

`token`: the worker token every RPC to these workers must carry, handed to each worker in its
environment (KILN_WORKER_TOKEN; never on its command line, which `ps` shows). None: the workers
have no token (KILN_WORKER_TOKEN is removed from their environment, so that they never require
one the caller does not know).

Supervision: once started, a thread per worker waits on it (reaping it: no zombie) and, when it
exits while not being stopped, restarts it on the same address after a backoff (RESTART_BACKOFF_S
doubling up to RESTART_BACKOFF_MAX_S; back to the start once a worker has stayed up for
STABLE_AFTER_S), logs it and calls `on_restart(address)`. Meanwhile the client pool finds the
worker down, answers 503 (WorkerUnavailableError) where no other worker can take a request, and
probes it back once it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from engine.errors import WorkerUnavailableError
from engine.worker.auth import TOKEN_ENV

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0
FOLDER_PREFIX = "kiln-workers-"
_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"(\d+)-")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_stale_folders() -> None:
    """Remove this user's ready-file folders whose owner process is no longer running (one killed
    with SIGKILL could not remove its own)."""
    for path in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        match = _FOLDER.match(path.name)
        try:
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if match and mine and not _running(int(match.group(1))):
            log.info("removing %s, left by process %s that is no longer running", path, match.group(1))
            shutil.rmtree(path, ignore_errors=True)


def _death_signal():
    """A function for the child (between fork and exec) that asks Linux to SIGTERM it when this
    process dies. Everything is looked up here, in the parent: a forked child of a threaded
    process must not import or take locks."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG, SIGTERM = 1, int(signal.SIGTERM)
    parent = os.getpid()

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl: no signal will come
            os._exit(1)

    return in_child


class LocalWorkers:
    def __init__(
        self,
        packages: Sequence[str | Path],
        count: int = 1,
        *,
        host: str = "127.0.0.1",
        ports: Sequence[int] | None = None,  # default: each picks a free port
        max_batch: int = 8,
        max_queue: int = 64,
        warmup_sizes: Sequence[str] = (),  # "WxH"; default: each package's default size
        batching: bool = True,
        threads: int = 0,
        devices: Sequence[str] | None = None,  # CUDA_VISIBLE_DEVICES of worker i = devices[i]
        drain_timeout: float = 30.0,
        session_cache: int | None = None,  # --session-cache; None: the worker's default
        extra_args: Sequence[str] = (),
        log_dir: str | Path | None = None,  # default: workers log to this process's stderr
        restart: bool = True,  # restart a worker that exits while not being stopped
        on_restart: Callable[[str], None] | None = None,  # called with the address once it is ready again
        token: str | None = None,  # the worker token (see the module docstring); None: no token
    ):
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if ports is not None and len(ports) != count:
            raise ValueError(f"{len(ports)} ports given for {count} workers")
        if devices is not None and len(devices) != count:
            raise ValueError(f"{len(devices)} devices given for {count} workers")
        self.packages = [Path(p) for p in packages]
        self.count = count
        self.host = host
        self.ports = list(ports) if ports is not None else [0] * count
        self.options = [
            "--max-batch", str(max_batch),
            "--max-queue", str(max_queue),
            "--threads", str(threads),
            "--drain-timeout", str(drain_timeout),
        ]  # fmt: skip
        if warmup_sizes:
            self.options += ["--warmup-size", ",".join(warmup_sizes)]
        if not batching:
            self.options.append("--no-batching")
        if session_cache is not None:
            self.options += ["--session-cache", str(session_cache)]
        self.options += list(extra_args)
        self.devices = list(devices) if devices is not None else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.processes: list[subprocess.Popen] = []
        self.addresses: list[str] = []
        self.restarts: list[int] = [0] * count
        self.restart = restart
        self.on_restart = on_restart
        self._token = token
        self._tmp: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a restart and stop() never interleave
        self._supervisors: list[threading.Thread] = []

    def command(self, index: int, ready_file: Path) -> list[str]:
        cmd = [sys.executable, "-m", "kiln.cli", "worker"]
        for package in self.packages:
            cmd += ["--package", str(package)]
        return cmd + ["--listen", f"{self.host}:{self.ports[index]}", "--ready-file", str(ready_file), *self.options]

    def _spawn(self, index: int, ready: Path, listen_port: int) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop(TOKEN_ENV, None)
        if self._token:
            env[TOKEN_ENV] = self._token
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.devices[index]
        out = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"worker-{index}.log", "ab")
        ready.unlink(missing_ok=True)
        ready.parent.mkdir(exist_ok=True)  # the last worker to stop cleanly removes the folder
        self.ports[index] = listen_port
        try:
            return subprocess.Popen(
                self.command(index, ready),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_death_signal(),
            )
        finally:
            if out:
                out.close()

    def _ready_file(self, index: int) -> Path:
        return Path(self._tmp) / f"worker-{index}.ready"

    def start(self, timeout: float = 300.0) -> list[str]:
        """Start the workers and wait until every one is ready; their addresses, in order."""
        _remove_stale_folders()
        self._tmp = tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-")
        self._stopping.clear()
        ready_files = [self._ready_file(i) for i in range(self.count)]
        self.processes = [self._spawn(i, ready, self.ports[i]) for i, ready in enumerate(ready_files)]
        end = time.monotonic() + timeout
        addresses: list[str | None] = [None] * self.count
        while None in addresses:
            for i, (proc, ready) in enumerate(zip(self.processes, ready_files)):
                if addresses[i] is None and ready.is_file():
                    addresses[i] = ready.read_text().strip()
                elif addresses[i] is None and proc.poll() is not None:
                    self.stop()
                    where = f"; see {self.log_dir / f'worker-{i}.log'}" if self.log_dir else ""
                    raise WorkerUnavailableError(f"worker {i} exited with status {proc.returncode} before it was ready{where}")
            if time.monotonic() > end:
                self.stop()
                raise WorkerUnavailableError(f"the workers were not ready within {timeout:g} s")
            time.sleep(0.05)
        self.addresses = [a for a in addresses if a]
        self._start_timeout = timeout
        if self.restart:
            self._supervisors = [
                threading.Thread(target=self._supervise, args=(i,), name=f"kiln-supervise-{i}", daemon=True)
                for i in range(self.count)
            ]
            for thread in self._supervisors:
                thread.start()
        log.info("%d local worker(s) ready: %s", self.count, ", ".join(self.addresses))
        return self.addresses

    def _supervise(self, index: int) -> None:
        """Wait on worker `index`; restart it (same address) whenever it exits while we run.

        Runs in its own thread, which also starts the restarted processes: on Linux a child's
        death signal follows the thread that started it, and this thread lives until stop()."""
        address = self.addresses[index]
        port = int(address.rsplit(":", 1)[1])
        backoff = RESTART_BACKOFF_S
        while True:
            proc = self.processes[index]
            started = time.monotonic()
            code = proc.wait()  # reaps it
            if self._stopping.is_set():
                return
            if time.monotonic() - started > STABLE_AFTER_S:
                backoff = RESTART_BACKOFF_S
            log.warning("worker %d (%s, pid %d) exited with status %s: restarting it in %.1f s", index, address, proc.pid, code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            with self._lock:
                if self._stopping.is_set():
                    return
                ready = self._ready_file(index)
                self.processes[index] = self._spawn(index, ready, port)
            if self._wait_ready(index, ready):
                self.restarts[index] += 1
                log.warning("worker %d (%s) restarted and ready (restart %d)", index, address, self.restarts[index])
                if self.on_restart:
                    self.on_restart(address)

    def _wait_ready(self, index: int, ready: Path) -> bool:
        """True once the restarted worker wrote its ready file; False if it exited or we stop."""
        end = time.monotonic() + self._start_timeout
        while not self._stopping.is_set() and time.monotonic() < end:
            if ready.is_file():
                return True
            if self.processes[index].poll() is not None:
                return False  # the loop waits on it and backs off
            self._stopping.wait(0.05)
        if not self._stopping.is_set():
            log.error("worker %d was not ready within %g s of its restart: killing it to try again", index, self._start_timeout)
            self.processes[index].kill()
        return False

    async def astart(self, timeout: float = 300.0) -> list[str]:
        return await asyncio.to_thread(self.start, timeout)

    def stop(self, timeout: float = 30.0) -> list[int | None]:
        """SIGTERM every worker (they drain), SIGKILL any still running after `timeout`; exit codes."""
        with self._lock:
            self._stopping.set()  # no restart from here on
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in self.processes:
            try:
                codes.append(proc.wait(max(0.0, end - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop within %g s: killing it", proc.pid, timeout)
                proc.kill()
                codes.append(proc.wait())
        for thread in self._supervisors:
            thread.join(timeout)
        self._supervisors = []
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return codes

    async def astop(self, timeout: float = 30.0) -> list[int | None]:
        return await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> LocalWorkers:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
