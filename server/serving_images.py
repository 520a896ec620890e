"""The OpenAI Images API on the same engine: generations, edits and variations.

`quality`, `style`, `background`, `input_fidelity`, `output_format` and `user` are accepted and
have no effect (the answer is a PNG). There is no temperature here: the seed is random unless the
request gives one (Kiln's `seed` extension).

Edits (`/v1/images/edits`): one input picture (`image`, or `image[]` holding one); `mask` by
OpenAI's rule (a PNG whose fully transparent pixels are repainted) or, without an alpha channel,
white = repaint; without a mask, an input with transparent pixels is inpainted there (OpenAI's
rule again), else the whole picture is redrawn at `strength` (img2img). `size` defaults to the
input's own size fitted to the model. Variations (`/v1/images/variations`): img2img of the picture
with no prompt at VARIATION_STRENGTH.
"""

from __future__ import annotations

import base64
import time
from typing import Awaitable, Callable

from server.edit_inputs import check_edit_inputs
from server.errors import BadRequestError
from server.generation import Generator, ImageJob, cancel_on_disconnect
from server.metrics import Metrics
from server.models_registry import ModelRegistry, ResolvedModel
from server.protocol import ImageData, ImageEditRequest, ImageGenerationRequest, ImagesResponse, ImageVariationRequest

ROUTE = "/v1/images/generations"
EDITS_ROUTE = "/v1/images/edits"
VARIATIONS_ROUTE = "/v1/images/variations"
# A variation keeps the picture's layout and colours and redraws its details: at 0.7 of the
# schedule the bundled model keeps the composition (engine/edits.py; README "Editing").
VARIATION_STRENGTH = 0.7
Receive = Callable[[], Awaitable[dict]]


class ImagesService:
    def __init__(self, registry: ModelRegistry, generator: Generator, metrics: Metrics, default_model: str):
        self.registry, self.generator, self.metrics = registry, generator, metrics
        self.default_model = default_model

    async def generate(self, req: ImageGenerationRequest, receive: Receive) -> ImagesResponse:
        model = await self.registry.resolve(req.model or self.default_model)
        job = self._job(model, req, req.prompt, req.negative_prompt, req.guidance_scale)
        return await self._answer(job, receive, ROUTE)

    async def edit(self, req: ImageEditRequest, receive: Receive) -> ImagesResponse:
        if req.stream:
            raise BadRequestError(
                "streaming edits are not served on this route: stream an edit through /v1/chat/completions", param="stream"
            )
        image = _one_image(req.image)
        model = await self.registry.resolve(req.model or self.default_model)
        await check_edit_inputs(image, req.mask, "image")
        job = self._job(
            model, req, req.prompt, req.negative_prompt, req.guidance_scale, image=image, mask=req.mask, strength=req.strength
        )
        return await self._answer(job, receive, EDITS_ROUTE)

    async def variation(self, req: ImageVariationRequest, receive: Receive) -> ImagesResponse:
        image = _one_image(req.image)
        model = await self.registry.resolve(req.model or self.default_model)
        await check_edit_inputs(image, None, "image")
        strength = req.strength if req.strength is not None else VARIATION_STRENGTH
        job = self._job(model, req, "", None, None, image=image, strength=strength)
        return await self._answer(job, receive, VARIATIONS_ROUTE)

    def _job(self, model: ResolvedModel, req, prompt: str, negative_prompt: str | None, guidance_scale: float | None, **edit) -> ImageJob:
        """The fields every Images API request has in common (no temperature: the seed is random unless given)."""
        return self.generator.job(
            model=model,
            prompt=prompt,
            size=req.size,
            n=req.n,
            temperature=None,
            seed=req.seed,
            negative_prompt=negative_prompt,
            steps=req.steps,
            guidance_scale=guidance_scale,
            sampler=req.sampler,
            response_format=req.response_format,
            loras=getattr(req, "loras", None),  # variations have none: no prompt to style
            **edit,
        )

    async def _answer(self, job: ImageJob, receive: Receive, route: str) -> ImagesResponse:
        result = await cancel_on_disconnect(self.generator.run(job), receive, self.metrics, route)
        if job.response_format == "b64_json":
            data = [
                ImageData(b64_json=base64.b64encode(png).decode("ascii"), seed=seed)
                for png, seed in zip(result.images_png, result.seeds)
            ]
        else:
            urls = await self.generator.publish(result.images_png, "url")
            data = [ImageData(url=url, seed=seed) for url, seed in zip(urls, result.seeds)]
        return ImagesResponse(created=int(time.time()), data=data)


def _one_image(images: list[bytes]) -> bytes:
    if len(images) > 1:
        raise BadRequestError(
            f"{len(images)} images were sent; this model family edits one picture at a time: send one", param="image[1]"
        )
    return images[0]
