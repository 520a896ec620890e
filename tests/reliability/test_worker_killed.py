"""kill -9 of the only worker in the middle of a batch, with requests in flight through `kiln serve`:
every request gets a 200 or a clean OpenAI-error 503 (none hangs: the clients time out), the
worker is restarted and the next requests are 200s."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests._workers import wait_for
from tests.reliability._live import chat, serve
from tests.test_server_errors import assert_error

CHAT = "/v1/chat/completions"
LONG = {"size": "128x128", "steps": 60}  # a few seconds for a batch of four on the tiny model
IN_FLIGHT = 8  # two batches' worth: some running, some queued in the worker when it dies


@pytest.fixture
def live(tiny_package, tmp_path):
    server = serve(tiny_package("sd1"), tmp_path)
    yield server
    server.stop()


def test_a_worker_killed_mid_batch_answers_200_or_503_and_is_restarted(live):
    def running() -> float:
        return live.metric("kiln_worker_running_images", worker=live.worker)

    async def in_flight_at_the_kill() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=90) as c:
            calls = [asyncio.create_task(c.post(CHAT, json=chat(f"shape {i}", seed=i, **LONG))) for i in range(IN_FLIGHT)]
            assert await asyncio.to_thread(wait_for, lambda: running() >= 2, 60), "a batch should be running"
            os.kill(live.worker_pids()[0], signal.SIGKILL)
            return await asyncio.gather(*calls)  # an httpx timeout here would be a hung request

    answers = asyncio.run(in_flight_at_the_kill())
    for r in answers:
        if r.status_code != 200:
            error = assert_error(r, 503, code="service_unavailable")
            assert r.headers["retry-after"] and error["type"] == "server_error"
    assert len(answers) == IN_FLIGHT

    live.wait_log("restarted and ready", timeout=120)
    live.wait_ready(timeout=60)

    async def after_the_restart() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=60) as c:
            return await asyncio.gather(*(c.post(CHAT, json=chat(seed=i)) for i in range(4)))

    assert [r.status_code for r in asyncio.run(after_the_restart())] == [200] * 4
    assert live.metric("kiln_worker_restarts_total", worker=live.worker) == 1
