"""One image to make: the per-image parameters the engine takes, and their validation."""

from __future__ import annotations

import msgspec

from engine.errors import InvalidRequestError

MAX_STEPS = 150  # a request over this is refused; the worker may configure a lower cap
MAX_GUIDANCE = 50.0


class ImageRequest(msgspec.Struct, frozen=True):
    prompt: str
    width: int
    height: int
    seed: int
    negative_prompt: str = ""
    steps: int | None = None  # None: the package's default
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    sampler: str | None = None


def validate_request(req: ImageRequest, max_steps: int = MAX_STEPS) -> None:
    """Raise InvalidRequestError naming the first bad parameter. Sizes are checked by shapes.py."""
    if not isinstance(req.prompt, str):
        raise InvalidRequestError("prompt must be a string", param="prompt")
    if not req.prompt.strip():
        raise InvalidRequestError("prompt is empty: describe the image to generate", param="prompt")
    if req.steps is not None and not (1 <= req.steps <= max_steps):
        raise InvalidRequestError(f"steps must be between 1 and {max_steps}, got {req.steps}", param="steps")
    if req.guidance_scale is not None and not (0.0 <= req.guidance_scale <= MAX_GUIDANCE):
        raise InvalidRequestError(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}, got {req.guidance_scale}", param="guidance_scale"
        )
    if req.guidance_rescale is not None and not (0.0 <= req.guidance_rescale <= 1.0):
        raise InvalidRequestError(
            f"guidance_rescale must be between 0 and 1, got {req.guidance_rescale}", param="guidance_rescale"
        )
    if not (0 <= req.seed < 2**63):
        raise InvalidRequestError(f"seed must be between 0 and 2**63-1, got {req.seed}", param="seed")
