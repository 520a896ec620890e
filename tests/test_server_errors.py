"""Every error the issue lists, against live servers and a real worker: OpenAI-shaped bodies with
the right status, `param` naming the field, `x-should-retry: false` for deterministic failures,
`Retry-After` for 429/503, and the openai client's matching exception classes."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from server.errors import ERROR_TABLE, error_response
from tests._server import API_KEY, MODEL, SECOND_KEY, free_port, shared_server, thread_server
from tests._workers import await_until

CHAT = "/v1/chat/completions"
LONG = {"size": "128x128", "steps": 150, "n": 2}  # about 1.5 s: long enough to act in the middle


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


def chat(prompt: str = "x", **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] is None or isinstance(error["code"], str)
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert r.headers["x-request-id"]
    return error


# ---- 400 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, param, words",
    [
        ({"size": "100x100"}, "size", "multiples of 8"),  # and the message lists what is allowed
        ({"size": "1024x1024"}, "size", "between 64 and 128"),  # over this server's max_side
        ({"size": "big"}, "size", "WIDTHxHEIGHT"),
        ({"n": 3}, "n", "between 1 and 2"),
        ({"n": 0}, "n", ">= 1"),
        ({"temperature": 2.5}, "temperature", "<= 2"),
        ({"steps": 151}, "steps", "<= 150"),
        ({"guidance_scale": -1}, "guidance_scale", ">= 0"),
        ({"sampler": "nonesuch"}, "sampler", "euler"),
        ({"response_format": "gif"}, "response_format", "url"),
        ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ],
)
def test_bad_parameter_is_400_naming_it(live, fields, param, words):
    with live.client() as c:
        r = c.post(CHAT, json=chat(**fields))
    error = assert_error(r, 400, param=param)
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false"


def test_size_error_lists_the_allowed_sizes(live):
    with live.client() as c:
        r = c.post(CHAT, json=chat(size="99x99"))
    message = assert_error(r, 400, param="size")["message"]
    assert "any WIDTHxHEIGHT with both sides multiples of 8 between 64 and 128" in message


def test_max_tokens_below_the_images_cost_is_400_stating_the_tokens_needed(live):
    with live.client() as c:
        r = c.post(CHAT, json=chat(size="128x128", n=2, max_tokens=7))
    message = assert_error(r, 400, param="max_tokens")["message"]
    assert "needs 8 completion tokens" in message


def test_seed_example_max_tokens_covers_one_image_at_the_default_1024x1024():
    from server.generation import image_tokens

    assert image_tokens(1024, 1024) == 256 <= 4096
    assert [image_tokens(*s) for s in ((256, 256), (512, 512), (1792, 1024), (1024, 1792))] == [16, 64, 448, 448]


def test_malformed_json_is_400(live):
    r = httpx.post(live.url + CHAT, headers={**live.headers, "content-type": "application/json"}, content=b'{"model": ')
    assert "not valid JSON" in assert_error(r, 400)["message"]
    assert r.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "body, param",
    [
        (chat(n="2"), "n"),
        ({"model": MODEL, "messages": "draw a cat"}, "messages"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"model": MODEL}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_wrong_types_and_missing_fields_are_400_naming_the_field(live, body, param):
    with live.client() as c:
        r = c.post(CHAT, json=body)
    assert_error(r, 400, param=param)


def test_a_body_that_is_not_an_object_is_400(live):
    with live.client() as c:
        assert_error(c.post(CHAT, json=[1, 2]), 400)
        assert_error(c.post(CHAT, content=b""), 400)


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "system", "content": "only a system message"}], "messages"),
        ([{"role": "user", "content": "   "}], "prompt"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}], "messages[0].content[0]"),
    ],
)
def test_a_request_without_a_usable_prompt_is_400(live, messages, param):
    with live.client() as c:
        assert_error(c.post(CHAT, json={"model": MODEL, "messages": messages}), 400, param=param)


def test_openai_client_raises_bad_request_error(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=9)
    assert e.value.status_code == 400 and e.value.param == "n"


# ---- 401 ------------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401_and_every_configured_key_works(live):
    body = chat()
    r = httpx.post(live.url + CHAT, json=body)
    assert "didn't provide an API key" in assert_error(r, 401, code="invalid_api_key")["message"]
    r = httpx.post(live.url + CHAT, json=body, headers={"Authorization": "Bearer wrong-key-000000"})
    error = assert_error(r, 401, code="invalid_api_key")
    assert "wrong-key" not in error["message"]  # keys are never echoed
    r = httpx.post(live.url + CHAT, json=body, headers={"Authorization": f"Basic {API_KEY}"})
    assert_error(r, 401)
    for key in (API_KEY, SECOND_KEY):  # both keys of KILN_API_KEYS
        assert httpx.post(live.url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200


def test_every_api_route_needs_the_key(live):
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/models/gpt-4o"), ("POST", "/v1/images/generations"), ("POST", CHAT)):
        assert_error(httpx.request(method, live.url + path, json={}), 401)


def test_openai_client_raises_authentication_error(live):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ---- 404 ------------------------------------------------------------------------------------


def test_unknown_model_is_404_model_not_found(live):
    with live.client() as c:
        r = c.post(CHAT, json={**chat(), "model": "gpt-5"})
        assert_error(r, 404, param="model", code="model_not_found")
        assert_error(c.post("/v1/images/generations", json={"prompt": "x", "model": "gpt-5"}), 404, code="model_not_found")
        assert_error(c.get("/v1/models/gpt-5"), 404, code="model_not_found")


def test_openai_client_raises_not_found_error(live):
    with pytest.raises(openai.NotFoundError) as e:
        live.openai().chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"


def test_expired_image_is_404(live):
    with live.client() as c:
        url = c.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"}).json()["data"][0]["url"]
        assert httpx.get(url).status_code == 200
        path = live.images / url.rsplit("/", 1)[1]
        old = time.time() - 61 * 60  # written 61 minutes ago: past the default 60-minute expiry
        os.utime(path, (old, old))
        assert_error(httpx.get(url), 404, code="image_not_found")
        assert_error(httpx.get(live.url + "/v1/images/files/" + "A" * 32 + ".png"), 404, code="image_not_found")
        assert_error(httpx.get(live.url + "/v1/images/files/..%2F..%2Fkiln.toml"), 404)


def test_unknown_route_is_404(live):
    assert_error(httpx.get(live.url + "/v2/nothing", headers=live.headers), 404, code="not_found")


# ---- 405, 413 ---------------------------------------------------------------------------------


def test_wrong_method_is_405(live):
    r = httpx.get(live.url + CHAT, headers=live.headers)
    assert_error(r, 405, code="method_not_allowed")
    assert "POST" in r.headers["allow"]


def test_body_over_the_limit_is_413(live):
    r = httpx.post(live.url + CHAT, headers=live.headers, json=chat("x" * 2_000_000))
    assert_error(r, 413, code="request_too_large")
    assert r.headers["x-should-retry"] == "false"


# ---- 429, 503, 504 ------------------------------------------------------------------------------


def test_full_worker_queue_is_429_with_retry_after(live):
    """The worker runs one sample at a time and queues 2 images: a running request plus a waiting
    n=2 request of the same size fill it, and the next one is refused at once."""
    rejected_before = live.metric("kiln_rejections_total", reason="queue_full")

    async def queued_images(c: httpx.AsyncClient) -> float:
        prefix = f'kiln_worker_queue_images{{worker="{live.worker}"}} '
        text = (await c.get("/metrics")).text
        return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)

    async def scenario():
        async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=60) as c:
            async with c.stream("POST", CHAT, json=chat(stream=True, **LONG)) as running:
                lines = running.aiter_lines()  # kept open (not closed by a `break`): the stream stays connected
                while '"progress"' not in await lines.__anext__():
                    pass
                waiting = asyncio.create_task(c.post(CHAT, json=chat(**LONG)))
                async def both_queued() -> bool:  # the worker's own metric says so
                    return await queued_images(c) == 2

                assert await await_until(both_queued, 60)
                try:
                    # a stream is refused before its 200 is sent: a real 429, not an error event
                    refused = await c.post(CHAT, json=chat(stream=True))
                    assert refused.status_code == 429 and refused.headers["retry-after"] == "2"
                    client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key=live.key, max_retries=0)
                    await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
                finally:
                    waiting.cancel()

    with pytest.raises(openai.RateLimitError) as e:
        asyncio.run(scenario())
    response = e.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"
    assert response.json()["error"]["code"] == "queue_full"
    assert live.metric("kiln_rejections_total", reason="queue_full") == rejected_before + 2


@pytest.fixture(scope="module")
def no_worker(tiny_package, tmp_path_factory):
    server = thread_server(tiny_package("sd1"), f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("images"))
    yield server
    server.stop()


def test_no_ready_worker_is_503_with_retry_after(no_worker):
    r = httpx.get(no_worker.url + "/ready")
    assert_error(r, 503, code="service_unavailable")
    assert r.headers["retry-after"] == "3"
    with pytest.raises(openai.InternalServerError) as e:
        no_worker.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 503
    assert e.value.response.headers["retry-after"] == "3"


def test_passed_deadline_is_504_without_retry(live, tiny_package, tmp_path):
    hasty = thread_server(tiny_package("sd1"), live.worker, tmp_path, request_timeout_s=0.3)
    try:
        with hasty.client() as c:
            r = c.post(CHAT, json=chat(**LONG))
        assert_error(r, 504, code="timeout")
        assert r.headers["x-should-retry"] == "false"
    finally:
        hasty.stop()


# ---- 500 ------------------------------------------------------------------------------------


def test_a_bug_is_500_without_a_stack_trace_in_the_body():
    try:
        raise ZeroDivisionError("secret internals")
    except ZeroDivisionError as e:
        response = error_response(e, "req_abc", retry_after_s=1)
    body = response.content.decode()
    assert response.status_code == 500
    assert "secret internals" not in body and "Traceback" not in body and "ZeroDivision" not in body
    assert "req_abc" in body
    assert response.headers["x-should-retry"] == "false"


def test_the_error_table_uses_string_or_null_codes_and_openai_types():
    for spec in ERROR_TABLE.values():
        assert spec.code is None or isinstance(spec.code, str)
        assert spec.type in {"invalid_request_error", "rate_limit_error", "server_error"}
        # Retry-After with every 429/503 a retry can cure; a deterministic 503 (a worker refusing
        # our token) tells clients not to retry instead.
        assert spec.retry_after == (spec.status in (429, 503) and spec.retry is not False)


# ---- hostile inputs ---------------------------------------------------------------------------


def test_a_size_of_thousands_of_digits_is_400_not_500(live):
    with live.client() as c:
        assert_error(c.post(CHAT, json=chat(size="9" * 4301 + "x256")), 400, param="size")


def test_json_nested_a_thousand_deep_is_400(live):
    body = b'{"model": "sd1", "messages": [{"role": "user", "content": "a"}], "junk": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    with live.client() as c:
        r = c.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert "nested too deeply" in r.json()["error"]["message"]


def test_a_symlink_named_like_an_image_id_is_not_followed(live, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for you")
    link = live.images / ("L" * 32 + ".png")
    link.symlink_to(secret)
    try:
        assert_error(httpx.get(live.url + "/v1/images/files/" + link.name), 404, code="image_not_found")
    finally:
        link.unlink()


def test_a_newline_in_the_url_cannot_forge_an_access_log_line(live):
    httpx.get(live.url + "/v2/x%0arequest_id=forged%20status=200")
    live.wait_log("path=/v2/x\\nrequest_id=forged\\x20status=200", timeout=10)  # the line, escaped
    lines = live.log.read_text(errors="replace").splitlines()
    assert not any(line.startswith("request_id=forged") for line in lines)


def test_a_negative_prompt_over_the_limit_is_400(live):
    with live.client() as c:
        assert_error(c.post(CHAT, json=chat(negative_prompt="x" * 5000)), 400, param="negative_prompt")
