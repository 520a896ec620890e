"""What both image APIs share: validating a job, running it on the workers, publishing the PNGs.

Token accounting (documented in the README): an image costs ceil(W/64) * ceil(H/64) completion
tokens, one per 64x64 tile -- 16 at 256x256, 64 at 512x512, 256 at 1024x1024, 448 at 1792x1024.
The closing text part is free. `max_tokens` below the images' cost is refused before any work.

Seeds: an explicit `seed` wins; otherwise `temperature: 0` derives one from the request (same
request, same image) and any other temperature draws a random one. Image k uses seed + k.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from typing import Any, Awaitable, Callable, TypeVar

import anyio
import msgspec

from engine.client.types import GenerationParams, GenerationResult, ProgressCallback
from engine.errors import InvalidRequestError, QueueFullError, WorkerUnavailableError
from engine.shapes import parse_size
from server.config import Config
from server.engine_port import EnginePort
from server.errors import BadRequestError, ClientDisconnectedError
from server.images_store import ImageStore, data_url
from server.metrics import Metrics
from server.models_registry import ResolvedModel

log = logging.getLogger("kiln.server.generation")

SEED_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")  # the contract's sizes
TILE = 64
T = TypeVar("T")


def image_tokens(width: int, height: int) -> int:
    """Completion tokens one image of this size costs: one per 64x64 tile."""
    return math.ceil(width / TILE) * math.ceil(height / TILE)


class ImageJob(msgspec.Struct, frozen=True):
    model: str  # the name the request used (echoed in responses)
    params: GenerationParams
    response_format: str  # "url" | "b64_json"

    @property
    def completion_tokens(self) -> int:
        return self.params.n * image_tokens(self.params.width, self.params.height)


def derived_seed(params: dict[str, Any]) -> int:
    """A seed that is a pure function of the request's content (for temperature 0)."""
    digest = hashlib.sha256(msgspec.json.encode(params, order="sorted")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def allowed_sizes_text(model: ResolvedModel) -> str:
    lo, hi, k = model.info.min_side, model.max_side, model.info.multiple_of
    fixed = [s for s in SEED_SIZES if all(lo <= int(v) <= hi and int(v) % k == 0 for v in s.split("x"))]
    any_size = f"any WIDTHxHEIGHT with both sides multiples of {k} between {lo} and {hi}"
    return (", ".join(fixed) + ", or " + any_size) if fixed else any_size


def resolve_size(size: str | None, model: ResolvedModel) -> tuple[int, int]:
    """The request's size (or the model's default) as (width, height), or a 400 naming `size`."""
    if size is None:
        for candidate in (model.config.default_size, model.info.default_size):
            w, h = parse_size(candidate)
            if _fits(w, h, model):
                return w, h
        raise BadRequestError(f"model '{model.requested}' has no usable default size; pass size", param="size")
    try:
        w, h = parse_size(size)
    except InvalidRequestError:
        w = h = -1
    if not _fits(w, h, model):
        raise BadRequestError(
            f"size {size!r} is not supported by model '{model.requested}'; use {allowed_sizes_text(model)}",
            param="size",
        )
    return w, h


def _fits(w: int, h: int, model: ResolvedModel) -> bool:
    lo, hi, k = model.info.min_side, model.max_side, model.info.multiple_of
    return all(lo <= v <= hi and v % k == 0 for v in (w, h))


class Generator:
    """Turns validated fields into an ImageJob, runs it on the workers, publishes the images."""

    def __init__(self, config: Config, engine: EnginePort, store: ImageStore, metrics: Metrics):
        self.config, self.engine, self.store, self.metrics = config, engine, store, metrics

    def job(
        self,
        *,
        model: ResolvedModel,
        prompt: str,
        size: str | None,
        n: int | None,
        temperature: float | None,
        seed: int | None,
        negative_prompt: str | None,
        steps: int | None,
        guidance_scale: float | None,
        sampler: str | None,
        response_format: str | None,
        preview_every: int = 0,
    ) -> ImageJob:
        limits = self.config.limits
        if not prompt.strip():
            raise BadRequestError("the prompt is empty: describe the image to generate", param="prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise BadRequestError(
                f"the prompt has {len(prompt)} characters; this server accepts at most {limits.max_prompt_chars}",
                param="prompt",
            )
        n = 1 if n is None else n
        if not (1 <= n <= limits.max_n):
            raise BadRequestError(f"n must be between 1 and {limits.max_n}, got {n}", param="n")
        if steps is not None and not (1 <= steps <= limits.max_steps):
            raise BadRequestError(f"steps must be between 1 and {limits.max_steps}, got {steps}", param="steps")
        if sampler is not None and not sampler.strip():
            raise BadRequestError("sampler is empty: leave it out for the model's default", param="sampler")
        width, height = resolve_size(size, model)
        steps = steps if steps is not None else model.config.default_steps
        content = {
            "model": model.config.worker_model,
            "prompt": prompt,
            "negative_prompt": negative_prompt or "",
            "size": [width, height],
            "steps": steps,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
        }
        if seed is None:
            seed = derived_seed(content) if temperature == 0 else secrets.randbits(63)
        seed = min(seed, 2**63 - 1 - n)  # image k uses seed + k
        params = GenerationParams(
            model=model.config.worker_model,
            prompt=prompt,
            width=width,
            height=height,
            seed=seed,
            n=n,
            negative_prompt=negative_prompt or "",
            steps=steps,
            guidance_scale=guidance_scale,
            sampler=sampler,
            preview_every=preview_every,
        )
        return ImageJob(model=model.requested, params=params, response_format=response_format or self.config.images.response_format)

    async def run(self, job: ImageJob, on_progress: ProgressCallback | None = None) -> GenerationResult:
        """One call to the workers, with the server's deadline and the metrics around it."""
        m = self.metrics
        m.queue_depth.inc()
        start = time.perf_counter()
        timeout = self.config.limits.request_timeout_s
        try:
            # The pool enforces the deadline; the outer timeout only guards against a pool that does not.
            async with asyncio.timeout(timeout + 5.0):
                result = await self.engine.generate(job.params, timeout=timeout, on_progress=on_progress)
        except QueueFullError:
            m.rejections.inc(reason="queue_full")
            raise
        except WorkerUnavailableError:
            m.rejections.inc(reason="unavailable")
            raise
        except TimeoutError:
            m.rejections.inc(reason="timeout")
            raise
        except InvalidRequestError:
            m.rejections.inc(reason="invalid")
            raise
        finally:
            m.queue_depth.dec()
        m.generation_seconds.observe(time.perf_counter() - start, model=job.params.model)
        m.images.inc(len(result.images_png), model=job.params.model)
        return result

    async def publish(self, pngs: list[bytes], response_format: str) -> list[str]:
        """Hosted URLs (files written off the event loop) or data: URLs."""
        if response_format == "b64_json":
            return [data_url(png) for png in pngs]
        ids = [await anyio.to_thread.run_sync(self.store.save, png) for png in pngs]
        return [self.store.url(i) for i in ids]


async def until_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when the client has gone away (the request body is already read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(work: Awaitable[T], receive: Callable[[], Awaitable[dict]], metrics: Metrics, route: str) -> T:
    """Await `work`; if the client disconnects first, cancel it (the worker drops its samples)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)  # let the cancellation reach the worker client
        metrics.cancellations.inc(route=route)
        log.info("client disconnected: generation cancelled")
        raise ClientDisconnectedError("the client closed the connection before the images were ready")
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
