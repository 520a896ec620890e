"""Hostile inputs sent together with ordinary requests: each is a 4xx OpenAI error, the ordinary
ones get their images, and the front end answers no 5xx. (tests/test_server_errors.py checks each
input's own error and the access log; a 200 KB header is tests/test_server_hostile_inputs.py's.)"""

from __future__ import annotations

import asyncio

import httpx

from benchmarks.soak import http_counts
from tests.reliability._live import chat
from tests.test_server_errors import assert_error

CHAT = "/v1/chat/completions"
NESTED = b'{"model": "sd1", "messages": [{"role": "user", "content": "a"}], "junk": ' + b"[" * 1000 + b"]" * 1000 + b"}"


def test_hostile_inputs_are_4xx_errors_and_ordinary_requests_beside_them_succeed(server):
    before = http_counts(server.url, method="POST") + http_counts(server.url, method="GET")

    async def together() -> dict[str, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60) as c:
            calls = {
                "size": c.post(CHAT, json=chat(size="9" * 4301 + "x256")),
                "nested": c.post(CHAT, content=NESTED, headers={"content-type": "application/json"}),
                "newline": c.get("/v1/images/files/x%0arequest_id=forged%20status=200.png"),
                "negative_prompt": c.post(CHAT, json=chat(negative_prompt="x" * 100_000)),
                **{f"ordinary {i}": c.post(CHAT, json=chat(seed=i)) for i in range(3)},
            }
            return dict(zip(calls, await asyncio.gather(*calls.values())))

    answers = asyncio.run(together())
    assert_error(answers["size"], 400, param="size")
    assert_error(answers["nested"], 400, code="invalid_json")
    assert_error(answers["newline"], 404)
    assert_error(answers["negative_prompt"], 400, param="negative_prompt")
    for i in range(3):
        assert answers[f"ordinary {i}"].status_code == 200, answers[f"ordinary {i}"].text
    after = http_counts(server.url, method="POST") + http_counts(server.url, method="GET")
    assert not [(route, status) for (route, status), n in after.items() if status >= 500 and n > before.get((route, status), 0)]
