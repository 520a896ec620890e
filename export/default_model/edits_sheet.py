"""A contact sheet of edits on the bundled model, drawn by Kiln's engine: input | mask | output.

    python -m export.default_model.edits_sheet models/kiln-shapes docs/edits-contact-sheet.png

Rows: a chat follow-up turn (img2img of the model's own picture to a new background), the same
edit of a picture the model did not draw (a small circle off centre), an inpainting that recolours
the masked circle, and a variation (empty prompt, strength 0.7, as /v1/images/variations). Each
caption gives the prompt, strength and seed, and what `evaluate_images.read_image` reads back.

The pictures and measurements here (`circle_picture`, `disc`, `shape_mask`, `iou`) are also what
tests/test_default_model_edits.py checks the served edits with.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .evaluate_images import FOREGROUND_DISTANCE, _largest_blob, border_median, read_image
from .render import Scene, render

log = logging.getLogger("kiln.default_model.edits_sheet")

SIDE = 256  # every picture here is SIDE x SIDE (the model draws at 128 and upscales)
FIRST_TURN = "a red circle on a blue background"
FOLLOW_UP = "a red circle on a green background"
RECOLOUR = "a green circle on a blue background"
VARIATION_STRENGTH = 0.7  # what /v1/images/variations uses (README)
MASK_MARGIN = 6  # px the inpainting mask reaches beyond the circle's edge
# A picture the model did not draw: a small red circle in the top-left quarter, 80 px across.
OFF_CENTRE = Scene("circle", "red", "blue", cx=0.25, cy=0.25, size=80 / SIDE)
CENTRED = Scene("circle", "red", "blue", cx=0.5, cy=0.5, size=0.5)


# ---- pictures and measurements (shared with tests/test_default_model_edits.py) ----------------


def circle_picture(scene: Scene) -> np.ndarray:
    """(SIDE, SIDE, 3) uint8: the scene drawn by the training renderer."""
    return render(scene, SIDE, SIDE)


def disc(scene: Scene, margin: float = 0.0) -> np.ndarray:
    """(SIDE, SIDE) bool: pixels whose centre lies within the scene's circle grown by `margin` px."""
    y, x = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    r = scene.size * SIDE / 2 + margin
    return (x - scene.cx * SIDE) ** 2 + (y - scene.cy * SIDE) ** 2 <= r * r


def shape_mask(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool: the shape, as `read_image` finds it: the largest blob of
    pixels farther than FOREGROUND_DISTANCE from the border's median colour."""
    far = np.linalg.norm(image.astype(np.float32) - border_median(image), axis=2) > FOREGROUND_DISTANCE
    return _largest_blob(far)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks (0 when both are empty)."""
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, "PNG")
    return out.getvalue()


# ---- the sheet ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    title: str
    image: np.ndarray  # (SIDE, SIDE, 3) uint8
    prompt: str
    strength: float
    mask: np.ndarray | None = None  # (SIDE, SIDE) bool, True = repaint


def edits(first_turn: np.ndarray, default_strength: float, inpaint_strength: float) -> list[Edit]:
    centred = circle_picture(CENTRED)
    return [
        Edit("follow-up turn", first_turn, FOLLOW_UP, default_strength),
        Edit("off-centre circle", circle_picture(OFF_CENTRE), FOLLOW_UP, default_strength),
        Edit("inpaint recolour", centred, RECOLOUR, inpaint_strength, disc(CENTRED, MASK_MARGIN)),
        Edit("variation", first_turn, "", VARIATION_STRENGTH),
    ]


def caption(edit: Edit, seed: int, output: np.ndarray) -> tuple[str, str]:
    prompt = f'"{edit.prompt}"' if edit.prompt else "(empty prompt)"
    reading = read_image(output)
    read = f"read back: {reading.colour} {reading.shape} on {reading.background}"
    if edit.mask is None:
        read += f", shape IoU with the input {iou(shape_mask(edit.image), shape_mask(output)):.2f}"
    return f"{edit.title}: {prompt}", f"strength {edit.strength:g}, seed {seed}; {read}"


def draw_sheet(rows: list[tuple[Edit, np.ndarray, tuple[str, str]]]) -> Image.Image:
    """Rows of input | mask | output, each with a two-line caption, under a header."""
    font = ImageFont.load_default(size=13)
    header, text_h, gap = 22, 38, 6
    row_h = SIDE + text_h + gap
    sheet = Image.new("RGB", (3 * SIDE + 4 * gap, header + len(rows) * row_h), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(("input", "mask (white = repaint)", "output")):
        draw.text((gap + c * (SIDE + gap) + 4, 4), name, font=font, fill=(230, 230, 230))
    for r, (edit, output, lines) in enumerate(rows):
        y = header + r * row_h
        sheet.paste(Image.fromarray(edit.image), (gap, y))
        x_mask = gap + SIDE + gap
        if edit.mask is not None:
            sheet.paste(Image.fromarray(edit.mask.astype(np.uint8) * 255), (x_mask, y))
        else:  # no mask: the whole picture is redrawn at `strength`
            draw.rectangle((x_mask, y, x_mask + SIDE - 1, y + SIDE - 1), fill=(70, 70, 70))
            mid = y + SIDE // 2
            draw.line((x_mask + SIDE // 2 - 20, mid, x_mask + SIDE // 2 + 20, mid), fill=(200, 200, 200), width=3)
            draw.text((x_mask + SIDE // 2 - 22, mid + 10), "no mask", font=font, fill=(200, 200, 200))
        sheet.paste(Image.fromarray(output), (gap + 2 * (SIDE + gap), y))
        for k, line in enumerate(lines):
            draw.text((gap + 2, y + SIDE + 3 + 17 * k), line, font=font, fill=(240, 240, 240))
    return sheet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path, nargs="?", default=Path("models/kiln-shapes"))
    p.add_argument("out", type=Path, nargs="?", default=Path("docs/edits-contact-sheet.png"))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from engine.pipeline import DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, ImageRequest, Pipeline
    from engine.sessions import RuntimeOptions
    from kiln.default_model import ensure_package

    pipe = Pipeline(ensure_package(a.model_dir), RuntimeOptions(threads=a.threads))
    start = time.monotonic()
    (first_turn,) = pipe.generate([ImageRequest(prompt=FIRST_TURN, width=SIDE, height=SIDE, seed=a.seed)])
    rows = []
    for edit in edits(first_turn, DEFAULT_STRENGTH, DEFAULT_INPAINT_STRENGTH):
        mask = png_bytes(edit.mask.astype(np.uint8) * 255) if edit.mask is not None else None  # white = repaint
        req = ImageRequest(prompt=edit.prompt, width=SIDE, height=SIDE, seed=a.seed, image=png_bytes(edit.image),
                           mask=mask, strength=edit.strength)  # fmt: skip
        (output,) = pipe.generate([req])
        rows.append((edit, output, caption(edit, a.seed, output)))
        log.info("%s: %s", edit.title, rows[-1][2][1])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    draw_sheet(rows).save(a.out)
    log.info("wrote %s in %.1f s", a.out, time.monotonic() - start)


if __name__ == "__main__":
    main()
