"""All shape arithmetic of sizes, latents and batches lives here and nowhere else."""

from __future__ import annotations

import re

from engine.errors import InvalidRequestError
from engine.manifest import SizeLimits

SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    """'1024x768' -> (width, height)."""
    m = SIZE_PATTERN.match(text or "")
    if not m:
        raise InvalidRequestError(f"size must look like WIDTHxHEIGHT (for example 512x512), got {text!r}", param=param)
    return int(m.group(1)), int(m.group(2))


def check_size(width: int, height: int, limits: SizeLimits, param: str = "size") -> None:
    for side, value in (("width", width), ("height", height)):
        if value % limits.multiple_of:
            raise InvalidRequestError(
                f"{side} {value} is not a multiple of {limits.multiple_of}; "
                f"try {value // limits.multiple_of * limits.multiple_of or limits.multiple_of}",
                param=param,
            )
        if not (limits.min_side <= value <= limits.max_side):
            raise InvalidRequestError(
                f"{side} {value} is outside this model's limits ({limits.min_side}..{limits.max_side})", param=param
            )


def latent_shape(width: int, height: int, channels: int, scale: int) -> tuple[int, int, int]:
    """Pixels -> one sample's latent shape (C, H/scale, W/scale)."""
    return channels, height // scale, width // scale


def render_size(width: int, height: int, limits: SizeLimits) -> tuple[int, int]:
    """The size the model actually draws for a (width, height) request.

    Requests within `render_max_side` are drawn as asked; larger ones at that longer side with the
    aspect ratio kept (multiples of 8), and the image is upscaled to the requested size.
    """
    cap = limits.render_max_side
    if not cap or max(width, height) <= cap:
        return width, height
    scale = cap / max(width, height)
    return (max(limits.min_side, round(width * scale / 8) * 8), max(limits.min_side, round(height * scale / 8) * 8))
