"""All shape arithmetic of sizes, latents and batches lives here and nowhere else."""

from __future__ import annotations

import re

from engine.errors import InvalidRequestError
from engine.manifest import SizeLimits

MIN_INPUT_SIDE = 16  # an input image smaller than this on a side has too little to edit

# At most 6 digits a side: anything longer is refused here, before int() (Python refuses to parse
# integers of over 4,300 digits, and no model draws a million pixels a side).
SIZE_PATTERN = re.compile(r"^\s*(\d{1,6})\s*[xX×]\s*(\d{1,6})\s*$")


def parse_size(text: str, param: str = "size") -> tuple[int, int]:
    """'1024x768' -> (width, height)."""
    m = SIZE_PATTERN.match(text or "")
    if not m:
        raise InvalidRequestError(f"size must look like WIDTHxHEIGHT (for example 512x512), got {text!r}", param=param)
    return int(m.group(1)), int(m.group(2))


def size_problem(width: int, height: int, limits) -> str | None:
    """Why width x height does not fit `limits` (anything with min_side, max_side, multiple_of:
    a manifest's SizeLimits or a worker's ModelLimits), or None when it fits."""
    for side, value in (("width", width), ("height", height)):
        if value % limits.multiple_of:
            return (
                f"{side} {value} is not a multiple of {limits.multiple_of} "
                f"(try {value // limits.multiple_of * limits.multiple_of or limits.multiple_of})"
            )
        if not (limits.min_side <= value <= limits.max_side):
            return f"{side} {value} is outside this model's limits ({limits.min_side}..{limits.max_side})"
    return None


def check_size(width: int, height: int, limits: SizeLimits, param: str = "size") -> None:
    problem = size_problem(width, height, limits)
    if problem:
        raise InvalidRequestError(problem, param=param)


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


def fit_size(width: int, height: int, limits) -> tuple[int, int]:
    """The size to draw an edit of a width x height input at, when the request names none: the
    input's own size, scaled (aspect kept) so its longer side is at most the model's default size's
    longer side (a 12-megapixel photo is edited at the model's native scale, not at max_side, where
    an SD model tiles its subjects) and its shorter at least min_side, rounded to the multiple.
    `limits`: anything with min_side, max_side, multiple_of, default_size (engine.request.ModelLimits).
    Raises InvalidRequestError (param "image") for an input that no allowed size resembles."""
    lo, k = limits.min_side, limits.multiple_of
    hi = min(limits.max_side, max(parse_size(limits.default_size)))
    if min(width, height) < MIN_INPUT_SIDE:
        raise InvalidRequestError(
            f"the image is {width}x{height}: too small to edit (at least {MIN_INPUT_SIDE} px a side)", param="image"
        )
    scale = 1.0
    if max(width, height) > hi:
        scale = hi / max(width, height)
    if min(width, height) * scale < lo:
        scale = lo / min(width, height)
    w, h = (max(k, int(round(v * scale / k)) * k) for v in (width, height))
    if min(w, h) < lo or max(w, h) > limits.max_side:
        raise InvalidRequestError(
            f"the image is {width}x{height}, an aspect ratio this model cannot draw (sides {lo}..{limits.max_side}); "
            f"crop it, or pass a size",
            param="image",
        )
    return w, h
