"""`stream: true` against a live server and a real worker: the chunk sequence, the openai client's
stream() helper, usage, and disconnects that cancel the generation in the worker."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests._server import MODEL, shared_server
from tests._workers import wait_for

LONG = {"size": "128x128", "steps": 150, "n": 2}  # about 1.5 s: long enough to act in the middle


@pytest.fixture(scope="module")
def live(tiny_package):
    return shared_server(tiny_package("sd1"))


def sse_events(live, body: dict) -> list:
    events = []
    with live.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_stream_sends_role_progress_image_parts_text_stop_usage_and_done(live):
    events = sse_events(
        live,
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "a red circle"}], "n": 2, "steps": 3,
         "stream": True, "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {c["model"] for c in chunks} == {"gpt-4o"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    progress = [c["progress"] for c in chunks if "progress" in c]
    assert {(p["image_index"], p["total_steps"]) for p in progress} == {(0, 3), (1, 3)}
    parts = [part for c in chunks if c["choices"] for part in c["choices"][0]["delta"].get("content", [])]
    assert [(p["index"], p["type"]) for p in parts] == [(0, "image_url"), (1, "image_url"), (2, "text")]
    stop = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(stop) == 1 and stop[0]["choices"][0]["finish_reason"] == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 2
    assert all(c["usage"] is None for c in chunks[:-1])  # include_usage: null until the last chunk


def test_stream_without_include_usage_has_no_usage_field(live):
    events = sse_events(live, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in events[:-1])


def test_openai_stream_helper_accumulates_the_image_parts(live):
    client = live.openai()
    with client.chat.completions.stream(
        model="gpt-4o",
        messages=[{"role": "user", "content": "a blue square"}],
        stream_options={"include_usage": True},
        extra_body={"n": 2, "steps": 2},
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    assert "chunk" in kinds and "content.done" in kinds
    content = final.choices[0].message.content
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    for part in content[:2]:
        assert httpx.get(part["image_url"]["url"], timeout=10).status_code == 200
    assert final.choices[0].finish_reason == "stop"
    assert final.usage.completion_tokens == 2


def test_openai_client_plain_stream_iterates_chunks(live):
    client = live.openai()
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    )
    deltas = [part for c in chunks if c.choices for part in (c.choices[0].delta.content or [])]
    assert [part["type"] for part in deltas] == ["image_url", "text"]


def test_stream_progress_can_carry_jpeg_previews(live):
    events = sse_events(
        live, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "steps": 4, "preview_every": 2}
    )
    previews = [c["progress"]["preview"] for c in events[:-1] if "preview" in c.get("progress", {})]
    assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews)


def cancelled_in_worker(live) -> float:
    return live.metric("kiln_worker_requests_cancelled", worker=live.worker)


def admitted_in_worker(live) -> float:
    return live.metric("kiln_worker_requests_admitted", worker=live.worker)


def test_streaming_client_disconnect_cancels_the_generation(live):
    route = "/v1/chat/completions"
    before = (live.metric("kiln_cancellations_total", route=route), cancelled_in_worker(live))
    with live.client() as c, c.stream(
        "POST", route, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, **LONG}
    ) as r:
        for line in r.iter_lines():
            if '"progress"' in line:
                break  # denoising has started: go away
    assert wait_for(lambda: live.metric("kiln_cancellations_total", route=route) == before[0] + 1)
    assert wait_for(lambda: cancelled_in_worker(live) == before[1] + 1)


async def disconnect_once_admitted(live, route: str, body: dict) -> None:
    """POST `body`, wait until the worker has admitted it (its own counter: denoising has begun),
    then drop the connection."""
    admitted = admitted_in_worker(live)
    async with httpx.AsyncClient(base_url=live.url, headers=live.headers, timeout=60) as c:
        task = asyncio.create_task(c.post(route, json=body))
        started = await asyncio.to_thread(wait_for, lambda: admitted_in_worker(live) > admitted or task.done(), 30)
        assert started and not task.done(), "the request should still be running when the client leaves"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.parametrize(
    "route, body",
    [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], **LONG}),
        ("/v1/images/generations", {"prompt": "x", **LONG}),
    ],
    ids=["chat", "images"],
)
def test_a_plain_client_disconnect_cancels_the_generation(live, route, body):
    before = (live.metric("kiln_cancellations_total", route=route), cancelled_in_worker(live))
    asyncio.run(disconnect_once_admitted(live, route, body))
    assert wait_for(lambda: live.metric("kiln_cancellations_total", route=route) == before[0] + 1)
    assert wait_for(lambda: cancelled_in_worker(live) == before[1] + 1)
