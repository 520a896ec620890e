"""`POST /v1/images/generations`: the OpenAI Images API on the same engine.

`quality`, `style` and `user` are accepted and have no effect. There is no temperature here: the
seed is random unless the request gives one (Kiln's `seed` extension).
"""

from __future__ import annotations

import base64
import time
from typing import Awaitable, Callable

from server.generation import Generator, cancel_on_disconnect
from server.metrics import Metrics
from server.models_registry import ModelRegistry
from server.protocol import ImageData, ImageGenerationRequest, ImagesResponse

ROUTE = "/v1/images/generations"
Receive = Callable[[], Awaitable[dict]]


class ImagesService:
    def __init__(self, registry: ModelRegistry, generator: Generator, metrics: Metrics, default_model: str):
        self.registry, self.generator, self.metrics = registry, generator, metrics
        self.default_model = default_model

    async def generate(self, req: ImageGenerationRequest, receive: Receive) -> ImagesResponse:
        model = await self.registry.resolve(req.model or self.default_model)
        job = self.generator.job(
            model=model,
            prompt=req.prompt,
            size=req.size,
            n=req.n,
            temperature=None,
            seed=req.seed,
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            sampler=req.sampler,
            response_format=req.response_format,
        )
        result = await cancel_on_disconnect(self.generator.run(job), receive, self.metrics, ROUTE)
        if job.response_format == "b64_json":
            data = [
                ImageData(b64_json=base64.b64encode(png).decode("ascii"), seed=seed)
                for png, seed in zip(result.images_png, result.seeds)
            ]
        else:
            urls = await self.generator.publish(result.images_png, "url")
            data = [ImageData(url=url, seed=seed) for url, seed in zip(urls, result.seeds)]
        return ImagesResponse(created=int(time.time()), data=data)
