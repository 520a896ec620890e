"""A bug in one request (KILN_FAULT_PROMPT injects one in the worker) is that request's 500 through
`kiln serve`; the requests sent with it get their images, and the worker is not restarted.
(tests/test_worker_faults.py proves the same at the worker pool.)"""

from __future__ import annotations

import asyncio

import httpx

from tests.reliability._live import chat
from tests.reliability.conftest import FAULT
from tests.test_server_errors import assert_error

CHAT = "/v1/chat/completions"


def test_a_faulty_request_is_one_500_and_its_batch_mates_succeed(server):
    prompts = ["a blue square", FAULT, "a red circle", "two stars"]
    restarts = server.metric("kiln_worker_restarts_total", worker=server.worker)

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as c:
            return await asyncio.gather(*(c.post(CHAT, json=chat(p, seed=i, steps=8)) for i, p in enumerate(prompts)))

    answers = asyncio.run(together())
    error = assert_error(answers[1], 500)
    assert error["type"] == "server_error" and "injected fault" in error["message"]
    for r in answers[:1] + answers[2:]:
        assert r.status_code == 200, r.text
        assert [p["type"] for p in r.json()["choices"][0]["message"]["content"]] == ["image_url", "text"]
    with server.client() as c:
        assert c.post(CHAT, json=chat("a green triangle")).status_code == 200
    assert server.metric("kiln_worker_restarts_total", worker=server.worker) == restarts
