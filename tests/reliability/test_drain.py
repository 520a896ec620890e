"""SIGTERM to `kiln serve` with a long Images API request in flight: the request completes with its
images, requests that arrive during the drain get a 503 OpenAI error with Retry-After, and the
process exits 0. (tests/test_server_shutdown.py covers chat, streams and the drain time limit.)"""

from __future__ import annotations

import asyncio
import base64
import signal

import httpx
import pytest

from tests._workers import wait_for
from tests.reliability._live import chat, serve

LONG = {"prompt": "a red circle", "size": "128x128", "steps": 150, "n": 2, "response_format": "b64_json"}


@pytest.fixture
def live(tiny_package, tmp_path):
    server = serve(tiny_package("sd1"), tmp_path, request_timeout_s=60)  # drain time: 65 s
    yield server
    server.stop()


def test_sigterm_lets_a_long_request_finish_and_refuses_newcomers(live):
    def admitted() -> float:
        return live.metric("kiln_worker_requests_admitted", worker=live.worker)

    async def drain() -> tuple[httpx.Response, list[httpx.Response]]:
        before = admitted()
        async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=90) as c:
            long = asyncio.create_task(c.post("/v1/images/generations", json=LONG))
            assert await asyncio.to_thread(wait_for, lambda: admitted() > before or long.done(), 30)
            assert not long.done(), "the long request should be denoising when SIGTERM comes"
            live.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(live.wait_log, "shutting down: no new requests", 30)
            newcomers = [
                await c.post("/v1/chat/completions", json=chat()),
                await c.post("/v1/images/generations", json={"prompt": "a green square"}),
            ]
            return await long, newcomers

    long, newcomers = asyncio.run(drain())
    for r in newcomers:  # (no assert_error: the drain's 503 has no x-request-id header yet)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "service_unavailable"
    assert not long.is_error, long.text
    images = [base64.b64decode(d["b64_json"]) for d in long.json()["data"]]
    assert len(images) == 2 and all(png.startswith(b"\x89PNG") for png in images)
    assert live.proc.wait(60) == 0
