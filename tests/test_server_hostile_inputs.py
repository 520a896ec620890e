"""Request heads over `server.max_header_bytes` are a 431 OpenAI error object, whichever layer
sees them (server/http_limits.py): uvicorn's h11 parser while the head is still arriving, the
ASGI layer when it arrived whole. The client reads the answer: no connection reset. Heads h11
cannot parse at all are a 400 error object. (The body-level hostile inputs -- a size of thousands
of digits, JSON nested a thousand deep, %0a in the path, symlinks under image ids, an overlong
negative prompt -- are in tests/test_server_errors.py.)"""

from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest

from tests._server import API_KEY, free_port, thread_server


@pytest.fixture(scope="module")
def front(tiny_package, tmp_path_factory):
    """A front end with the default limit (65,536 bytes), run with `kiln serve`'s uvicorn options.
    No worker: every request here is answered before one would be needed."""
    server = thread_server(tiny_package("sd1"), f"127.0.0.1:{free_port()}", tmp_path_factory.mktemp("images"))
    yield server
    server.stop()


def assert_431(r: httpx.Response, param: str | None) -> dict:
    assert r.status_code == 431, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "request_header_too_large"
    assert error["param"] == param
    assert "server.max_header_bytes" in error["message"] and "65,536" in error["message"]
    assert r.headers["x-request-id"].startswith("req_")
    return error


def raw_exchange(url: str, head: bytes) -> tuple[int, dict, bytes]:
    """Send `head` on a fresh connection; read the answer to its end (the server closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        s.shutdown(socket.SHUT_WR)  # then read: a reset here would raise ConnectionResetError
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.split(b"\r\n")
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in (line.partition(b":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_a_200_kb_authorization_header_is_a_431_object_naming_the_header(front):
    r = httpx.get(front.url + "/v1/models", headers={"Authorization": "Bearer " + "k" * 200_000})
    error = assert_431(r, "authorization")
    assert "k" * 100 not in error["message"]  # the value (a key) is never echoed


def test_the_openai_client_reads_the_431_instead_of_a_reset_connection(front):
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="k" * 200_000, max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as e:
        client.models.list()
    assert e.value.status_code == 431
    assert e.value.code == "request_header_too_large"


def test_a_head_still_arriving_when_it_passes_the_limit_is_a_431_from_the_parser(front):
    """The head never ends: h11 gives up once it buffered more than the limit."""
    status, headers, body = raw_exchange(front.url, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 100_000)
    assert status == 431 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["code"] == "request_header_too_large" and error["param"] == "cookie"
    assert "passed the limit" in error["message"]


def test_a_complete_head_over_the_limit_is_a_431_from_the_asgi_layer(tiny_package, tmp_path):
    """With h11 buffering more than the limit, a whole head over it reaches the ASGI layer, which
    measures it: the limit holds however the bytes arrive."""
    server = thread_server(
        tiny_package("sd1"),
        f"127.0.0.1:{free_port()}",
        tmp_path,
        server={"max_header_bytes": 4096},
        uvicorn_options={"h11_max_incomplete_event_size": 1_000_000},
    )
    try:
        r = httpx.get(server.url + "/health", headers={"x-padding": "p" * 5000})
        assert r.status_code == 431 and r.json()["error"]["param"] == "x-padding"
        assert "is 5,1" in r.json()["error"]["message"] and "4,096" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/health", headers={"x-padding": "p" * 3000}).status_code == 200
    finally:
        server.stop()


def test_a_head_under_the_limit_but_over_uvicorns_default_is_served(front):
    """uvicorn alone refuses heads over 16 KiB; Kiln's limit is the configured one."""
    r = httpx.get(front.url + "/health", headers={"Cookie": "c" * 40_000})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_a_request_line_h11_cannot_parse_is_a_400_object(front):
    status, headers, body = raw_exchange(front.url, b"GET /health HTTP/1.1\r\nHost x\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"
    assert "not valid HTTP/1.1" in error["message"]


def test_the_server_keeps_serving_after_refused_heads(front):
    for _ in range(3):
        httpx.get(front.url + "/health", headers={"Authorization": "Bearer " + "k" * 100_000})
    r = httpx.get(front.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code in (200, 503)  # no worker: the models list may be unavailable, not broken
    assert httpx.get(front.url + "/health").status_code == 200
