"""Edits keep their meaning through a real server on the bundled model: chat follow-up turns and
inpainting, read back with the evaluator that scores the model (export/default_model/).

A `kiln serve` process of its own (the shared test server runs the tiny random-weight model at
2 steps and 128 px), on the bundled model's package at its own default steps, 256x256.

Margins, measured through the engine at the default strengths (0.5; 1.0 with a mask) on seeds
0..11 (256x256): every follow-up read green background and red circle; the circle's IoU with the
input's was 0.80..0.92 on the model's own pictures and 0.57..0.77 on the off-centre one; the
inpainting recolour read green on 8 of 8 seeds. So one seed, a median case rather than a lucky
one, and no k-of-m rule.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from export.default_model.edits_sheet import (
    CENTRED,
    FIRST_TURN,
    FOLLOW_UP,
    MASK_MARGIN,
    OFF_CENTRE,
    RECOLOUR,
    SIDE,
    circle_picture,
    disc,
    iou,
    png_bytes,
    shape_mask,
)
from export.default_model.evaluate_images import nearest_colour, read_image
from kiln.default_model import DEFAULT_MODEL
from tests._server import API_KEY, LiveServer, free_port, start_serve, wait_ready

pytest.importorskip("torch")  # the package is exported from the checkpoint

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KILN_TEST_CACHE", ROOT / "build" / "test-cache"))  # as tests/conftest.py
MODEL = "kiln-shapes"
SEED = 1  # a median case of seeds 0..11 (at strength 0.6 it gave follow-up IoU 0.86, off-centre 0.51)


def config(package: Path, port: int, images: Path) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[[models]]
name = "{MODEL}"
package = "{package}"
default_size = "{SIDE}x{SIDE}"
max_side = {SIDE}

[workers]
local = 1
threads = 2
max_batch = 2
warmup_sizes = ["{SIDE}x{SIDE}"]
start_timeout_s = 120

[images]
dir = "{images}"
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`kiln serve` on the bundled model (its package is exported once and cached)."""
    from export.package import build_package

    if not (DEFAULT_MODEL / "model_index.json").is_file():
        pytest.fail(f"the bundled model is missing from {DEFAULT_MODEL}")
    package = build_package(DEFAULT_MODEL, CACHE / "packages", target="cpu")
    base = tmp_path_factory.mktemp("kiln-shapes-server")
    port = free_port()
    proc, log = start_serve(base, config(package.resolve(), port, base / "images"), {**os.environ, "KILN_API_KEYS": API_KEY})
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(url=url, key=API_KEY, images=base / "images", worker="", log=log, proc=proc)
    try:
        wait_ready(server.url, 180, proc, log)
        yield server
    finally:
        server.stop()


def decoded(url_or_b64: str) -> np.ndarray:
    """A hosted image URL, a data: URL or bare base64 PNG -> (H, W, 3) uint8."""
    if url_or_b64.startswith("http"):
        data = httpx.get(url_or_b64, timeout=10).content
    else:
        data = base64.b64decode(url_or_b64.split(",", 1)[-1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def chat(live, messages: list[dict], **extra):
    """One chat completion through the official openai client: (its content parts, the picture)."""
    answer = live.openai().chat.completions.create(
        model=MODEL, messages=messages, extra_body={"size": f"{SIDE}x{SIDE}", "seed": SEED, **extra}
    )
    content = answer.choices[0].message.content  # Kiln answers a list of parts: image_url(s), then text
    [url] = [part["image_url"]["url"] for part in content if part["type"] == "image_url"]
    return content, decoded(url)


def closing_text(content: list[dict]) -> str:
    return content[-1]["text"]


# ---- chat: a follow-up turn edits the latest picture ------------------------------------------


def test_follow_up_turn_changes_the_background_and_keeps_the_red_circle_in_place(live):
    """Turn 2 ("... on a green background"), at the default strength, edits turn 1's picture, sent
    back as the assistant's content (the hosted URL): the background turns green, the circle stays
    red and its mask overlaps turn 1's at IoU >= 0.5. (On the model's own pictures the IoU cannot
    tell an edit from a fresh drawing, which puts the circle in the same place for the same seed:
    the next test, on a picture the model did not draw, can.)"""
    history = [{"role": "user", "content": FIRST_TURN}]
    first, before = chat(live, history)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": FOLLOW_UP}]
    second, after = chat(live, history)

    assert first[0]["image_url"]["url"].startswith(live.url + "/v1/images/files/")
    assert closing_text(second).startswith("Here is the edited image"), closing_text(second)
    read_before, read_after = read_image(before), read_image(after)
    assert (read_before.background, read_before.colour) == ("blue", "red"), read_before
    assert (read_after.background, read_after.colour) == ("green", "red"), read_after
    overlap = iou(shape_mask(before), shape_mask(after))
    print(f"two-turn chat: IoU {overlap:.2f}")
    assert overlap >= 0.5, f"the circle moved: IoU {overlap:.2f} with turn 1's"


def test_follow_up_on_an_attached_picture_keeps_its_off_centre_circle_in_place(live):
    """A small red circle in the top-left quarter (drawn by the renderer, not the model) attached
    as a data: URL, "... on a green background" at the default strength: green background, red
    circle, IoU >= 0.5 with the input's circle. The model's own drawing of that prompt puts the
    circle in the middle (IoU <= 0.23 on seeds 0..11); the edit at 0.5 keeps it (0.57..0.77)."""
    picture = circle_picture(OFF_CENTRE)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")
    parts = [{"type": "text", "text": FOLLOW_UP}, {"type": "image_url", "image_url": {"url": url}}]
    content, after = chat(live, [{"role": "user", "content": parts}], response_format="b64_json")

    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    reading = read_image(after)
    assert (reading.background, reading.colour) == ("green", "red"), reading
    overlap = iou(shape_mask(picture), shape_mask(after))
    print(f"off-centre follow-up: IoU {overlap:.2f}")
    assert overlap >= 0.5, f"the circle moved: IoU {overlap:.2f} with the input's"


# ---- inpainting through the official openai client --------------------------------------------


def test_inpainting_recolours_the_masked_circle_and_keeps_the_rest_of_the_picture(live):
    """A red circle on blue, OpenAI's mask (transparent = repaint) over the circle grown by
    MASK_MARGIN px, "a green circle on a blue background": pixels more than 8 px outside the mask
    are the input's within 3/255 (the feathered paste-back), and the circle reads green."""
    picture = circle_picture(CENTRED)
    repaint = disc(CENTRED, MASK_MARGIN)
    alpha = np.where(repaint, 0, 255).astype(np.uint8)
    mask = np.dstack([np.zeros((SIDE, SIDE, 3), np.uint8), alpha])  # (H, W, 4) RGBA
    result = live.openai().images.edit(
        model=MODEL,
        image=("circle.png", png_bytes(picture), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt=RECOLOUR,
        size=f"{SIDE}x{SIDE}",
        response_format="b64_json",
        extra_body={"seed": SEED},
    )
    out = decoded(result.data[0].b64_json)

    far_outside = ~disc(CENTRED, MASK_MARGIN + 8)
    kept = np.abs(out.astype(np.int16) - picture)[far_outside].max()
    assert kept <= 3, f"pixels far outside the mask changed by up to {kept}/255"
    inside = disc(CENTRED, -MASK_MARGIN)  # away from the feathered seam
    colour = nearest_colour(np.median(out[inside].astype(np.float32), axis=0))
    assert colour == "green", f"the masked circle reads {colour}"
    assert read_image(out).background == "blue"
