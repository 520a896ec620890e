"""Read a generated image back into (shape, colour, background), to score prompt following.

- background: median colour of the border pixels -> nearest reference colour;
- shape colour: median of the shape's interior pixels (more than 60 RGB distance from the
  background, largest connected blob, edges eroded) -> nearest reference colour;
- shape class: two geometric features of that blob, nearest class prototype:
  fill = area / bounding-box area (square 1.0, circle pi/4, triangle 1/2, star ~0.4) and
  solidity = area / convex-hull area (star ~0.6, the others ~1).

`validate_on_renders` checks the whole reader on rendered images with known answers.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .render import COLOUR_NAMES, COLOURS, SHAPES, random_scene, render

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as "shape"
ANALYSIS_SIZE = 128  # shape features are measured on a copy at most this many pixels a side
_REFERENCE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)  # (8, 3)

# Feature prototypes (fill, solidity): means measured on rendered 256x256 scenes read at 128 px.
_PROTOTYPES = {
    "circle": (0.78, 0.975),
    "square": (1.0, 1.0),
    "triangle": (0.515, 0.97),
    "star": (0.405, 0.58),
}
_WEIGHTS = np.array([1.0, 1.5])


@dataclass(frozen=True)
class Reading:
    shape: str | None  # None: no blob found
    colour: str | None
    background: str


def nearest_colour(rgb: np.ndarray) -> str:
    """Name of the reference colour closest to `rgb` (3,)."""
    d = np.linalg.norm(_REFERENCE - np.asarray(rgb, np.float32)[None], axis=1)
    return COLOUR_NAMES[int(np.argmin(d))]


def border_median(img: np.ndarray) -> np.ndarray:
    """Median RGB of the outer ring (3 % of the shorter side, at least 2 px) of (H, W, 3) `img`."""
    h, w, _ = img.shape
    k = max(2, round(0.03 * min(h, w)))
    ring = np.concatenate(
        [img[:k].reshape(-1, 3), img[-k:].reshape(-1, 3), img[:, :k].reshape(-1, 3), img[:, -k:].reshape(-1, 3)]
    )
    return np.median(ring.astype(np.float32), axis=0)


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected True region of (H, W) bool `mask`, as a bool mask."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    queue.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of (N, 2) points (Andrew's monotone chain, then shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def shape_features(blob: np.ndarray) -> tuple[float, float]:
    """(fill, solidity) of a non-empty (H, W) bool blob; pixels are unit squares."""
    ys, xs = np.nonzero(blob)
    area = float(len(ys))
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    # Hull of the pixel squares: each row's two outermost pixels, by their outer corners.
    corners = []
    for y in np.unique(ys):
        row = xs[ys == y]
        lo, hi = row.min() - 0.5, row.max() + 0.5
        corners += [(lo, y - 0.5), (lo, y + 0.5), (hi, y - 0.5), (hi, y + 0.5)]
    hull = _hull_area(np.array(corners))
    return area / box, min(1.0, area / hull) if hull > 0 else 1.0


def classify_shape(fill: float, solidity: float) -> str:
    f = np.array([fill, solidity])
    dist = {s: float(np.sum(_WEIGHTS * (f - np.array(p)) ** 2)) for s, p in _PROTOTYPES.items()}
    return min(dist, key=dist.get)


def _downsample(img: np.ndarray, limit: int) -> np.ndarray:
    """Box-average (H, W, 3) to at most `limit` pixels on the longer side (integer factor)."""
    h, w, _ = img.shape
    f = max(1, int(np.ceil(max(h, w) / limit)))
    h2, w2 = h // f, w // f
    return img[: h2 * f, : w2 * f].astype(np.float32).reshape(h2, f, w2, f, 3).mean(axis=(1, 3))


def read_image(img: np.ndarray) -> Reading:
    """Read (H, W, 3) uint8 `img` into shape class, shape colour and background colour."""
    bg_rgb = border_median(img)
    background = nearest_colour(bg_rgb)
    small = _downsample(img, ANALYSIS_SIZE)
    mask = np.linalg.norm(small - bg_rgb[None, None], axis=2) > FOREGROUND_DISTANCE
    blob = _largest_blob(mask)
    if blob.sum() < 4:
        return Reading(shape=None, colour=None, background=background)
    # Interior: drop the blob's edge pixels, where colours blend with the background.
    inner = blob.copy()
    inner[1:] &= blob[:-1]
    inner[:-1] &= blob[1:]
    inner[:, 1:] &= blob[:, :-1]
    inner[:, :-1] &= blob[:, 1:]
    pixels = small[inner] if inner.sum() >= 4 else small[blob]
    colour = nearest_colour(np.median(pixels, axis=0))
    return Reading(shape=classify_shape(*shape_features(blob)), colour=colour, background=background)


@dataclass(frozen=True)
class Accuracy:
    n: int
    shape: float
    colour: float
    background: float


def validate_on_renders(n: int = 400, seed: int = 0) -> Accuracy:
    """Accuracy of `read_image` on `n` rendered scenes of varied sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    sizes = [(256, 256), (128, 128), (512, 512), (256, 128), (128, 256), (448, 256)]
    hits = np.zeros(3)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        scene = random_scene(rng, aspect=w / h)
        r = read_image(render(scene, w, h))
        hits += [r.shape == scene.shape, r.colour == scene.colour, r.background == scene.background]
    return Accuracy(n, *(hits / n))


if __name__ == "__main__":
    print(validate_on_renders())
