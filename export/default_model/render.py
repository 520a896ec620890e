"""Deterministic renderer of the default model's world: one flat shape on a flat background.

A scene is a shape (circle, square, triangle, star) of one named colour on a background of another,
at a position and size. Positions are fractions of the image's width and height; the size is a
fraction of the image's shorter side, so one scene renders at any WxH and keeps its layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")

# The reference colours: a pixel near one of these reads as the colour a person would name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "orange": (245, 140, 20),
    "purple": (130, 40, 170),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

MIN_SIZE, MAX_SIZE = 0.28, 0.70  # shape's bounding box side / image's shorter side
SMALL_BELOW, BIG_ABOVE = 0.40, 0.56  # size words: "small" below, "big" above, nothing between
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star
SUPERSAMPLE = 2  # draw at 2x and box-filter down: smooth edges, still deterministic


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height
    size: float  # bounding box side, fraction of min(width, height)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} is not one of {SHAPES}")
        for name in (self.colour, self.background):
            if name not in COLOURS:
                raise ValueError(f"colour {name!r} is not one of {COLOUR_NAMES}")
        if self.colour == self.background:
            raise ValueError(f"shape and background are both {self.colour!r}; they must differ")

    @property
    def size_word(self) -> str | None:
        if self.size < SMALL_BELOW:
            return "small"
        if self.size > BIG_ABOVE:
            return "big"
        return None

    @property
    def position_words(self) -> str:
        """'top left', 'bottom', 'center', ...: the image split into thirds each way."""
        row = "top" if self.cy < 1 / 3 else "bottom" if self.cy > 2 / 3 else ""
        col = "left" if self.cx < 1 / 3 else "right" if self.cx > 2 / 3 else ""
        return f"{row} {col}".strip() or "center"


def random_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    aspect: float = 1.0,
) -> Scene:
    """Draw a scene; unspecified fields are random. `aspect` = width / height of the target image,
    so the shape stays inside the frame."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    if background is None:
        others = [c for c in COLOUR_NAMES if c != colour]
        background = others[rng.integers(len(others))]
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    # Half extents as fractions of width and height (size is relative to the shorter side).
    half_w = size / 2 * min(1.0, 1 / aspect)
    half_h = size / 2 * min(1.0, aspect)
    margin = 0.03
    cx = float(rng.uniform(half_w + margin, 1 - half_w - margin))
    cy = float(rng.uniform(half_h + margin, 1 - half_h - margin))
    return Scene(shape, colour, background, cx, cy, size)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices (pixels) of an axis-aligned shape whose bounding box is about 2r on a side."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, base at the bottom of the box
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "star":  # five points, one straight up; nudged down so its box is centred
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * STAR_INNER
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        dy = r * (1 - math.cos(math.pi / 5)) / 2
        return [(x, y + dy) for x, y in pts]
    raise ValueError(f"no polygon for shape {shape!r}")


def render(scene: Scene, width: int = 256, height: int = 256) -> np.ndarray:
    """Draw `scene` at `width`x`height`. Returns (H, W, 3) uint8."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (width * s, height * s), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    cx, cy = scene.cx * width * s, scene.cy * height * s
    r = scene.size * min(width, height) * s / 2
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(scene.shape, cx, cy, r), fill=fill)
    img = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)
