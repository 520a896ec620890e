"""A contact sheet of sample prompts x image sizes, drawn by Kiln's engine (what users get).

    python -m export.default_model.contact_sheet models/kiln-shapes build/samples.png \
        --sizes 256x256 512x512 1024x1024 1792x1024 1024x1792
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from PIL import Image, ImageDraw

from .evaluate import GUIDANCE, GUIDANCE_RESCALE, STEPS

log = logging.getLogger("kiln.default_model.contact_sheet")

PROMPTS = (
    "a red circle on a blue background",
    "yellow background, small purple star at the top left",
    "a big white triangle, black background",
    "a green square on an orange background",
)
CELL = 192  # each image is fitted into a CELL x CELL box


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--sizes", nargs="+", default=["256x256", "512x512"], help="WxH")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from engine.pipeline import ImageRequest, Pipeline
    from engine.sessions import RuntimeOptions
    from kiln.default_model import ensure_package

    pipe = Pipeline(ensure_package(a.model_dir), RuntimeOptions(threads=a.threads))
    sizes = [tuple(int(v) for v in s.split("x")) for s in a.sizes]
    label_h = 14
    sheet = Image.new("RGB", (CELL * len(sizes), (CELL + label_h) * len(PROMPTS)), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for r, prompt in enumerate(PROMPTS):
        for c, (w, h) in enumerate(sizes):
            start = time.monotonic()
            req = ImageRequest(prompt=prompt, width=w, height=h, seed=a.seed, steps=STEPS, guidance_scale=GUIDANCE,
                               guidance_rescale=GUIDANCE_RESCALE, sampler="ddim")
            img = Image.fromarray(pipe.generate([req])[0])
            log.info("%dx%d %r: %.1f s", w, h, prompt, time.monotonic() - start)
            img.thumbnail((CELL, CELL))
            y = r * (CELL + label_h) + label_h
            sheet.paste(img, (c * CELL + (CELL - img.width) // 2, y + (CELL - img.height) // 2))
            draw.text((c * CELL + 2, r * (CELL + label_h)), f"{w}x{h}: {prompt}"[:34], fill=(255, 255, 255))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    log.info("wrote %s", a.out)


if __name__ == "__main__":
    main()
