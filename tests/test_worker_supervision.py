"""Supervision of local workers: a worker that dies is reaped and restarted on its address, and
requests meanwhile fail cleanly (503) instead of hanging; through `kiln serve`, /ready and
/metrics say so. Synchronised on the restart callback and on /ready, never on sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest

from engine.client.pool import WorkerPool
from engine.errors import WorkerUnavailableError
from engine.request import ImageRequest
from tests._server import MODEL
from tests._workers import start_workers


def is_reaped(pid: int) -> bool:
    """True when no process (running or zombie) has this pid any more."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except FileNotFoundError:
        return True
    return state not in "RSDZT"  # a reused pid of another state is not ours


def test_a_killed_worker_is_reaped_restarted_on_its_address_and_serves_again(tiny_package):
    restarted = threading.Event()
    addresses: list[str] = []
    workers = start_workers(tiny_package("sd1"), on_restart=lambda address: (addresses.append(address), restarted.set()))
    try:
        (address,) = workers.addresses
        old = workers.processes[0].pid
        os.kill(old, signal.SIGKILL)
        assert restarted.wait(120), "the worker was not restarted"
        assert addresses == [address] and workers.restarts == [1]
        assert workers.processes[0].pid != old and is_reaped(old)

        async def generate():
            async with WorkerPool([address]) as pool:
                return await pool.generate(ImageRequest(model="sd1", prompt="a cat", width=64, height=64, seed=1, steps=2), timeout=60)

        assert len(asyncio.run(generate()).images_png) == 1
    finally:
        workers.stop()
    assert all(p.poll() is not None for p in workers.processes)


def test_stopping_does_not_restart_and_leaves_no_folder(tiny_package):
    workers = start_workers(tiny_package("sd1"))
    folder = Path(workers._tmp)
    codes = workers.stop()
    assert codes == [0] and workers.restarts == [0]
    assert not folder.exists()


def test_requests_while_the_only_worker_restarts_fail_with_503_not_a_hang(tiny_package):
    restarted = threading.Event()
    workers = start_workers(tiny_package("sd1"), on_restart=lambda _: restarted.set())
    try:
        (address,) = workers.addresses

        async def during_restart():
            async with WorkerPool([address], probe_interval=0.2) as pool:
                workers.processes[0].kill()
                workers.processes[0].wait()  # dead for sure before the request
                with pytest.raises(WorkerUnavailableError):
                    await pool.generate(ImageRequest(model="sd1", prompt="a", width=64, height=64, seed=1, steps=2), timeout=30)
                assert await asyncio.to_thread(restarted.wait, 120)
                # no worker marked up: the pool asks the down one before giving up, and it is back
                return await pool.generate(ImageRequest(model="sd1", prompt="a", width=64, height=64, seed=1, steps=2), timeout=60)

        assert len(asyncio.run(during_restart()).images_png) == 1
    finally:
        workers.stop()


def test_kiln_serve_restarts_a_killed_worker_and_counts_it(tiny_package, tmp_path):
    """Through the real front end: 503 with Retry-After while the worker is down, /ready back to
    200 once it is up, `kiln_worker_restarts_total` counts it."""
    from tests._server import serve_process

    live = serve_process(tiny_package("sd1"), tmp_path)
    try:
        worker_pid = live.worker_pids()[0]
        os.kill(worker_pid, signal.SIGKILL)
        with live.client() as c:
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
            if r.status_code != 200:  # the restart may already have finished on a fast machine
                assert r.status_code == 503 and "retry-after" in r.headers, r.text
            live.wait_log("restarted and ready", timeout=120)
            live.wait_ready(timeout=60)
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
            assert r.status_code == 200, r.text
        metrics = httpx.get(live.url + "/metrics").text
        assert f'kiln_worker_restarts_total{{worker="{live.worker}"}} 1' in metrics
        assert is_reaped(worker_pid)
    finally:
        live.stop()
