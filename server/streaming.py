"""Server-Sent Events for `stream: true`: `chat.completion.chunk` objects, then `data: [DONE]`.

Order of chunks (all with the same id, created and model):
  1. `delta: {"role": "assistant"}`
  2. progress while denoising: an empty delta and a top-level `progress` object
     (`image_index`, `step`, `total_steps`, optionally a JPEG `preview` data: URL)
  3. one chunk per image: `delta.content = [{"index": k, "type": "image_url", "image_url": {"url": ...}}]`
  4. the text part: `delta.content = [{"index": n, "type": "text", "text": ...}]`
     (OpenRouter's shape, with `modalities`: 3. is `delta.images = [{"index": k, "type": "image_url",
     ...}]` per image and 4. `delta.content = "<the text>"`)
  5. `delta: {}`, `finish_reason: "stop"` (and the images' `seeds`)
  6. with `stream_options.include_usage`: `choices: []` and `usage` (every earlier chunk has `usage: null`)
Every content part carries an integer `index`, which is how the openai client's `stream()` helper
merges list-valued deltas. An error after the 200 was sent ends the stream with
`data: {"error": {...}}` and `data: [DONE]`. A client that disconnects cancels the generation.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import AsyncIterator, Awaitable, Callable

import msgspec

from engine.client.types import Progress
from server.errors import ClientDisconnectedError, error_event
from server.generation import Generator, ImageJob, until_disconnect
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    ImageUrlDelta,
    ImageUrlOut,
    StreamProgress,
    TextDelta,
    Usage,
)

log = logging.getLogger("kiln.server.streaming")

ROUTE = "/v1/chat/completions"
KEEPALIVE_S = 10.0  # an SSE comment when nothing else was sent for this long
DONE_EVENT = b"data: [DONE]\n\n"
_FINISHED = object()  # queue marker: the generation task is done
_encoder = msgspec.json.Encoder()


def sse(payload: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


class ChatStream:
    def __init__(
        self,
        *,
        job: ImageJob,
        generator: Generator,
        metrics: Metrics,
        completion_id: str,
        model: str,
        text: str,
        include_usage: bool,
        request_id: str = "-",
        shape: str = "content_parts",
    ):
        self.job, self.generator, self.metrics = job, generator, metrics
        self.id, self.model, self.text = completion_id, model, text
        self.include_usage = include_usage
        self.request_id = request_id
        self.shape = shape
        self.created = int(time.time())
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._pending: object | None = None

    def _on_progress(self, progress: Progress) -> None:
        # The pool may call this from another thread; the queue belongs to the event loop.
        self._loop.call_soon_threadsafe(self._queue.put_nowait, progress)

    async def start(self, receive: Callable[[], Awaitable[dict]]) -> None:
        """Start the generation and wait for its first sign of life, so that a refusal (full queue,
        no worker, bad parameter found by the worker) still gets its own HTTP status."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.ensure_future(self.generator.run(self.job, on_progress=self._on_progress))
        self._task.add_done_callback(lambda _: self._queue.put_nowait(_FINISHED))
        getter = asyncio.ensure_future(self._queue.get())
        watcher = asyncio.ensure_future(until_disconnect(receive))
        try:
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter.done():
                self._pending = getter.result()
                if self._pending is _FINISHED and self._task.exception() is not None:
                    raise self._task.exception()
                return
            self._cancel()
            raise ClientDisconnectedError("the client closed the connection before the stream started")
        except BaseException:
            self._cancel()
            raise
        finally:
            getter.cancel()
            watcher.cancel()

    def _cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self.metrics.cancellations.inc(route=ROUTE)
            log.info("client disconnected: streaming generation cancelled")

    def _chunk(self, delta: Delta, finish_reason: str | None = None, **extra) -> bytes:
        return sse(
            ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
                usage=None if self.include_usage else msgspec.UNSET,
                **extra,
            )
        )

    def _progress(self, p: Progress) -> bytes:
        preview = msgspec.UNSET
        if p.preview_jpeg:
            preview = "data:image/jpeg;base64," + base64.b64encode(p.preview_jpeg).decode("ascii")
        progress = StreamProgress(image_index=p.image_index, step=p.step, total_steps=p.total_steps, preview=preview)
        return self._chunk(Delta(), progress=progress)

    async def events(self) -> AsyncIterator[bytes]:
        assert self._task is not None, "start() first"
        getter: asyncio.Future | None = None
        try:
            yield self._chunk(Delta(role="assistant"))
            item = self._pending
            while item is not _FINISHED:
                if isinstance(item, Progress):
                    yield self._progress(item)
                getter = getter or asyncio.ensure_future(self._queue.get())
                done, _ = await asyncio.wait({getter}, timeout=KEEPALIVE_S)
                if not done:
                    item = None
                    yield b": keep-alive\n\n"
                    continue
                item, getter = getter.result(), None
            try:
                result = self._task.result()
                urls = await self.generator.publish(result.images_png, self.job.response_format)
            except Exception as e:  # the 200 is already sent: report in-band, then end the stream
                log.warning("stream %s failed: %s: %s", self.id, type(e).__name__, e)
                yield error_event(e, self.request_id)
                yield DONE_EVENT
                return
            if self.shape == "message_images":  # OpenRouter's: pictures in delta.images, the text as a string
                for k, url in enumerate(urls):
                    yield self._chunk(Delta(images=[ImageUrlDelta(index=k, image_url=ImageUrlOut(url=url))]))
                yield self._chunk(Delta(content=self.text))
            else:
                for k, url in enumerate(urls):
                    yield self._chunk(Delta(content=[ImageUrlDelta(index=k, image_url=ImageUrlOut(url=url))]))
                yield self._chunk(Delta(content=[TextDelta(index=len(urls), text=self.text)]))
            yield self._chunk(Delta(), finish_reason="stop", seeds=list(result.seeds))
            if self.include_usage:
                tokens = self.job.completion_tokens
                prompt_tokens = result.prompt_tokens + self.job.input_image_tokens
                usage = Usage(
                    prompt_tokens=prompt_tokens,
                    completion_tokens=tokens,
                    total_tokens=prompt_tokens + tokens,
                )
                yield sse(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))
            yield DONE_EVENT
        finally:
            if getter is not None:
                getter.cancel()
            self._cancel()
