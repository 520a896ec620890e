"""The typed contract between the front end and the worker pool.

The front end builds a `GenerationParams`, calls `WorkerPool.generate(...)` and gets a
`GenerationResult` or one of engine.errors' exceptions (each mapped to an HTTP status in one
table in server/). Nothing here imports grpc, onnxruntime or torch.
"""

from __future__ import annotations

from typing import Callable

import msgspec


class GenerationParams(msgspec.Struct, frozen=True):
    model: str  # the worker-side model (package) name
    prompt: str
    width: int
    height: int
    seed: int
    n: int = 1  # images; image k uses seed + k
    negative_prompt: str = ""
    steps: int | None = None  # None: the package's default
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    sampler: str | None = None
    preview_every: int = 0  # streaming: a small JPEG preview every k steps (0: none)


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


class ModelInfo(msgspec.Struct, frozen=True):
    name: str
    family: str
    default_size: str
    min_side: int
    max_side: int
    multiple_of: int
    default_steps: int
    max_batch: int


ProgressCallback = Callable[[Progress], None]
