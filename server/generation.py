"""What both image APIs share: validating a job, running it on the workers, publishing the PNGs.

Token accounting (documented in the README): an image costs ceil(W/64) * ceil(H/64) completion
tokens, one per 64x64 tile -- 16 at 256x256, 64 at 512x512, 256 at 1024x1024, 448 at 1792x1024.
The closing text part is free. `max_tokens` below the images' cost is refused before any work.
An edit's input picture adds the same count, at the edited size, to the prompt tokens.

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

from engine.client.types import GenerationResult, ProgressCallback
from engine.errors import InvalidRequestError, QueueFullError, UnknownLoraError, WorkerUnavailableError
from engine.image_input import image_size
from engine.request import ImageRequest, LoraChoice, allowed_sizes_text, size_fits, validate_request, with_prompt_loras
from engine.shapes import fit_size, parse_size
from server.config import Config
from server.engine_port import EnginePort
from server.errors import BadRequestError, ClientDisconnectedError
from server.images_store import ImageStore, data_url
from server.metrics import Metrics
from server.models_registry import ResolvedModel
from server.shutdown import Drain

log = logging.getLogger("kiln.server.generation")

TILE = 64
T = TypeVar("T")


def image_tokens(width: int, height: int) -> int:
    """Completion tokens one image of this size costs: one per 64x64 tile."""
    return math.ceil(width / TILE) * math.ceil(height / TILE)


class ImageJob(msgspec.Struct, frozen=True):
    model: str  # the name the request used (echoed in responses)
    params: ImageRequest
    response_format: str  # "url" | "b64_json"

    @property
    def completion_tokens(self) -> int:
        return self.params.n * image_tokens(self.params.width, self.params.height)

    @property
    def input_image_tokens(self) -> int:
        """An edit's input picture counts as prompt tokens at the edited size, by the same tile
        rule as the images made (the mask is free): 16 for a 256x256 edit."""
        return image_tokens(self.params.width, self.params.height) if self.params.is_edit else 0


def derived_seed(params: dict[str, Any]) -> int:
    """A seed that is a pure function of the request's content (for temperature 0)."""
    digest = hashlib.sha256(msgspec.json.encode(params, order="sorted")).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def resolve_size(size: str | None, model: ResolvedModel, image: bytes | None = None, image_param: str = "image") -> tuple[int, int]:
    """The request's size as (width, height), or a 400 naming `size`. Without one: an edit's
    input's own size fitted to the model (engine.shapes.fit_size), else the configured default."""
    limits = model.limits
    if size is None:
        if image is not None:
            try:
                return fit_size(*image_size(image, image_param), limits)
            except InvalidRequestError as e:
                raise BadRequestError(str(e), param=image_param if e.param == "image" else e.param) from None
        for candidate in (model.config.default_size, limits.default_size):
            w, h = parse_size(candidate)
            if size_fits(w, h, limits):
                return w, h
        raise BadRequestError(f"model '{model.requested}' has no usable default size; pass size", param="size")
    try:
        w, h = parse_size(size)
    except InvalidRequestError:
        w = h = -1
    if not size_fits(w, h, limits):
        raise BadRequestError(
            f"size {size[:40]!r} is not supported by model '{model.requested}'; use {allowed_sizes_text(limits)}",
            param="size",
        )
    return w, h


class Generator:
    """Turns validated fields into an ImageJob, runs it on the workers, publishes the images."""

    def __init__(self, config: Config, engine: EnginePort, store: ImageStore, metrics: Metrics, drain: Drain | None = None):
        self.config, self.engine, self.store, self.metrics = config, engine, store, metrics
        self.drain = drain

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
        image: bytes | None = None,
        mask: bytes | None = None,
        strength: float | None = None,
        image_param: str = "image",
        loras: list[LoraChoice] | None = None,
    ) -> ImageJob:
        """Everything checked before any work, by the same `validate_request` the workers run,
        against their limits (capped by this server's configuration)."""
        if sampler is not None and not sampler.strip():
            raise BadRequestError("sampler is empty: leave it out for the model's default", param="sampler")
        width, height = resolve_size(None if size == "auto" else size, model, image, image_param)
        n = 1 if n is None else n
        steps = steps if steps is not None else model.config.default_steps
        if image is not None and strength is None:  # filled here so that it is checked here
            strength = model.limits.default_inpaint_strength if mask is not None else model.limits.default_strength
        content = {
            "model": model.config.worker_model,
            "prompt": prompt,
            "negative_prompt": negative_prompt or "",
            "size": [width, height],
            "steps": steps,
            "guidance_scale": guidance_scale,
            "sampler": sampler,
            "image": hashlib.sha256(image).hexdigest() if image is not None else None,
            "mask": hashlib.sha256(mask).hexdigest() if mask is not None else None,
            "strength": strength,
        }
        try:
            # the worker gets the prompt without its <lora:...> tags, and the tags join `loras`
            asked = with_prompt_loras(ImageRequest(prompt=prompt, loras=tuple(loras or ())))
        except InvalidRequestError as e:
            raise BadRequestError(str(e), param=e.param) from None
        prompt = asked.prompt
        if asked.loras:  # a request without LoRAs keeps the seed it had before LoRAs existed
            content["prompt"] = prompt
            content["loras"] = sorted([c.name, c.scale] for c in asked.loras)
        if seed is None:
            seed = derived_seed(content) if temperature == 0 else secrets.randbits(63)
        seed = min(seed, 2**63 - 1 - n)  # image k uses seed + k
        params = ImageRequest(
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
            image=image,
            mask=mask,
            strength=strength,
            loras=asked.loras,
        )
        try:
            validate_request(params, model.limits)
        except UnknownLoraError:
            raise  # its own code (lora_not_found), message and param
        except InvalidRequestError as e:
            param = image_param if e.param == "image" else e.param
            raise BadRequestError(str(e), param=param) from None
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
                result = await self._until_shutdown(self.engine.generate(job.params, timeout=timeout, on_progress=on_progress))
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

    async def _until_shutdown(self, work: Awaitable[T]) -> T:
        """`work`, unless the shutdown's drain time passes first: then it is cancelled (the worker
        drops its samples) and the client gets a 503 to retry elsewhere (server/shutdown.py)."""
        if self.drain is None:
            return await work
        task = asyncio.ensure_future(work)
        expired = asyncio.ensure_future(self.drain.expired.wait())
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)  # let the cancellation reach the worker
            raise WorkerUnavailableError("the server shut down before the images were ready; retry")
        finally:
            expired.cancel()
            if not task.done():
                task.cancel()

    async def publish(self, pngs: list[bytes], response_format: str) -> list[str]:
        """Hosted URLs (files written off the event loop) or data: URLs."""
        if response_format == "b64_json":
            return [data_url(png) for png in pngs]
        ids = await anyio.to_thread.run_sync(self.store.save_all, pngs)
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
