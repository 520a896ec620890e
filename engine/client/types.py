"""The typed contract between the front end and the worker pool.

The front end builds an `engine.request.ImageRequest` (the one request type of every layer),
calls `WorkerPool.generate(...)` and gets a `GenerationResult` or one of engine.errors' exceptions (each mapped to an HTTP status in one
table in server/). Nothing here imports grpc, onnxruntime or torch.
"""

from __future__ import annotations

from typing import Callable

import msgspec

from engine.request import ImageRequest, ModelLimits


class Progress(msgspec.Struct, frozen=True):
    image_index: int  # 0..n-1
    step: int  # steps done for that image
    total_steps: int
    preview_jpeg: bytes | None = None


class GenerationResult(msgspec.Struct, frozen=True):
    images_png: list[bytes]  # n PNG files, in order
    seeds: list[int]
    prompt_tokens: int  # the prompt's tokens by the model's own tokenizer
    worker: str  # address of the worker that made them
    engine_seconds: float  # time inside the worker, queueing included


ProgressCallback = Callable[[Progress], None]

__all__ = ["GenerationResult", "ImageRequest", "ModelLimits", "Progress", "ProgressCallback"]
