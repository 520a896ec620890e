"""SIGTERM to `kiln serve` loses nothing: requests in flight finish (JSON, or a stream ending with
[DONE]), new ones get a 503 error object with Retry-After while the socket is still open, and
past the drain time the rest are ended with a 503 -- never uvicorn's plain-text 500.
Synchronised on progress events and log lines, never on sleeps."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests._server import MODEL, serve_process
from tests._workers import wait_for

LONG = {"size": "128x128", "steps": 150, "n": 2}  # a few seconds on the tiny model


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "a red circle"}], **LONG, **extra}


class StreamReader(threading.Thread):
    """Reads one SSE stream in the background; `progressing` is set at the first progress chunk."""

    def __init__(self, live):
        super().__init__(daemon=True)
        self.live, self.events, self.status = live, [], None
        self.progressing = threading.Event()

    def run(self) -> None:
        try:
            with self.live.client() as c, c.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    event = data if data == "[DONE]" else json.loads(data)
                    self.events.append(event)
                    if isinstance(event, dict) and "progress" in event:
                        self.progressing.set()
        finally:
            self.progressing.set()


class Request(threading.Thread):
    def __init__(self, live):
        super().__init__(daemon=True)
        self.live, self.response = live, None

    def run(self) -> None:
        with self.live.client() as c:
            self.response = c.post("/v1/chat/completions", json=chat_body())


@pytest.fixture
def started(tiny_package, tmp_path):
    servers = []

    def start(**limits):
        live = serve_process(tiny_package("sd1"), tmp_path, **limits)
        servers.append(live)
        return live

    yield start
    for live in servers:
        live.stop()


def test_sigterm_lets_requests_in_flight_finish_and_refuses_new_ones_with_503(started):
    live = started(request_timeout_s=60)  # drain time: 65 s
    stream, plain = StreamReader(live), Request(live)
    stream.start()
    assert stream.progressing.wait(60) and stream.status == 200
    plain.start()
    # both in flight: the front end's queue-depth metric counts generations sent to the workers
    assert wait_for(lambda: live.metric("kiln_generation_queue_depth") >= 2, 30)
    live.proc.send_signal(signal.SIGTERM)
    live.wait_log("shutting down: no new requests", timeout=30)

    with live.client() as c:
        refused = c.post("/v1/chat/completions", json=chat_body())
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "service_unavailable"
    request_id = refused.headers["x-request-id"]  # traced like any other request
    live.wait_log(f"request_id={request_id} method=POST path=/v1/chat/completions route=draining status=503", timeout=30)

    stream.join(120)
    plain.join(120)
    assert stream.events[-1] == "[DONE]"
    parts = [e for e in stream.events[:-1] if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert [p["choices"][0]["delta"]["content"][0]["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert plain.response.status_code == 200, plain.response.text
    assert len(plain.response.json()["choices"][0]["message"]["content"]) == 3
    assert live.proc.wait(60) == 0


def test_past_the_drain_time_requests_end_with_a_503_error_object(started):
    live = started(request_timeout_s=60, drain_timeout_s=0.5)
    stream = StreamReader(live)
    stream.start()
    assert stream.progressing.wait(60)
    live.proc.send_signal(signal.SIGTERM)
    stream.join(60)
    assert stream.events[-1] == "[DONE]"
    error = stream.events[-2]["error"]
    assert error["code"] == "service_unavailable" and "shut down" in error["message"]
    assert live.proc.wait(60) == 0
    assert "drain time (0.5 s) passed" in live.log.read_text()


def test_health_and_metrics_stay_open_while_draining(started):
    live = started(request_timeout_s=60)
    stream = StreamReader(live)
    stream.start()
    assert stream.progressing.wait(60)
    live.proc.send_signal(signal.SIGTERM)
    live.wait_log("shutting down: no new requests", timeout=30)
    assert httpx.get(live.url + "/health").status_code == 200
    assert httpx.get(live.url + "/ready").status_code == 503
    assert "kiln_http_requests_total" in httpx.get(live.url + "/metrics").text
    stream.join(120)
    assert stream.events[-1] == "[DONE]"
