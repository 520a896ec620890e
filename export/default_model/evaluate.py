"""Score how well a model follows prompts: generate held-out prompts, read the images back.

Half the prompts use (shape, colour, background) triples that training never showed; half use
training triples with new seeds, positions and the evaluation-only phrasings. Each image is read
by `evaluate_images.read_image` and compared with the scene the prompt asked for.

Generation is a swappable function `Generate = (prompts, seeds) -> list of (H, W, 3) uint8`; this
module ships the diffusers (PyTorch) one, the engine (ONNX) one plugs in the same way.

    python -m export.default_model.evaluate models/kiln-shapes --n 100 --grid build/eval.png
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .captions import EVAL_TEMPLATES, TRAIN_TEMPLATES, caption, split_triples
from .evaluate_images import read_image
from .render import random_scene

log = logging.getLogger("kiln.default_model.evaluate")

Generate = Callable[[list[str], list[int]], list[np.ndarray]]  # -> each (H, W, 3) uint8

# Sampling settings the targets are defined with (issue 8).
STEPS, GUIDANCE, GUIDANCE_RESCALE = 20, 6.0, 0.7
EVAL_SEED = 10_000  # far from any seed training uses


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    seed: int
    half: str  # "unseen" (held-out triple) or "seen" (training triple, new phrasing and seed)
    shape: str
    colour: str
    background: str


def eval_prompts(n: int = 100, seed: int = EVAL_SEED) -> list[EvalPrompt]:
    """`n` prompts, half on held-out triples (each used in turn), half on training triples."""
    split = split_triples()
    rng = np.random.default_rng(seed)
    held_out = [split.held_out[j] for j in rng.permutation(len(split.held_out))]  # mixed shapes
    out = []
    for i in range(n):
        unseen = i % 2 == 0
        if unseen:
            triple = held_out[(i // 2) % len(held_out)]
            templates = TRAIN_TEMPLATES + EVAL_TEMPLATES
        else:
            triple = split.train[rng.integers(len(split.train))]
            templates = EVAL_TEMPLATES
        scene = random_scene(rng, *triple)
        out.append(EvalPrompt(caption(scene, rng, templates), seed + i, "unseen" if unseen else "seen", *triple))
    return out


def diffusers_generate(model_dir: Path, size: tuple[int, int] = (256, 256), batch: int = 4) -> Generate:
    """Generation through diffusers' StableDiffusionPipeline (PyTorch, fp32, CPU)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    width, height = size

    def generate(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        images = []
        for i in range(0, len(prompts), batch):
            gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]  # one per image
            out = pipe(
                prompts[i : i + batch],
                height=height,
                width=width,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                guidance_rescale=GUIDANCE_RESCALE,
                generator=gens,
                output_type="np",
            ).images  # (B, H, W, 3) float in [0, 1]
            images += [(im * 255).round().clip(0, 255).astype(np.uint8) for im in out]
        return images

    return generate


def engine_generate(model_dir: Path, size: tuple[int, int] = (256, 256), batch: int = 8, threads: int = 2,
                    target: str = "cpu") -> Generate:
    """Generation through Kiln's engine: the `target` package (exported if missing or stale), numpy DDIM."""
    from engine.pipeline import ImageRequest, Pipeline
    from engine.sessions import RuntimeOptions
    from kiln.default_model import ensure_package

    pipe = Pipeline(ensure_package(Path(model_dir), target), RuntimeOptions(threads=threads))
    width, height = size

    def generate(prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        images = []
        for i in range(0, len(prompts), batch):
            reqs = [
                ImageRequest(prompt=p, width=width, height=height, seed=s, steps=STEPS, guidance_scale=GUIDANCE,
                             guidance_rescale=GUIDANCE_RESCALE, sampler="ddim")
                for p, s in zip(prompts[i : i + batch], seeds[i : i + batch])
            ]
            images += pipe.generate(reqs)
        return images

    return generate


@dataclass(frozen=True)
class HalfScore:
    n: int
    colour: float
    background: float
    shape: float


def score(prompts: list[EvalPrompt], images: list[np.ndarray]) -> dict[str, HalfScore]:
    """Accuracy per half ('unseen', 'seen') and over all prompts."""
    rows = []
    for p, img in zip(prompts, images, strict=True):
        r = read_image(img)
        rows.append((p.half, r.colour == p.colour, r.background == p.background, r.shape == p.shape))
    out = {}
    for half in ("unseen", "seen", "all"):
        sel = [r for r in rows if half == "all" or r[0] == half]
        if sel:
            a = np.array([r[1:] for r in sel], dtype=float).mean(axis=0)
            out[half] = HalfScore(len(sel), *(round(float(x), 3) for x in a))
    return out


def contact_sheet(images: list[np.ndarray], columns: int = 10, tile: int = 96) -> np.ndarray:
    """Thumbnails of `images` in a grid. Returns (H, W, 3) uint8."""
    from PIL import Image

    thumbs = [np.asarray(Image.fromarray(im).resize((tile, tile), Image.Resampling.BILINEAR)) for im in images]
    rows = -(-len(thumbs) // columns)
    sheet = np.full((rows * tile, columns * tile, 3), 128, np.uint8)
    for i, t in enumerate(thumbs):
        y, x = divmod(i, columns)
        sheet[y * tile : (y + 1) * tile, x * tile : (x + 1) * tile] = t
    return sheet


def evaluate(generate: Generate, n: int = 100) -> tuple[dict[str, HalfScore], list[EvalPrompt], list[np.ndarray]]:
    prompts = eval_prompts(n)
    images = generate([p.prompt for p in prompts], [p.seed for p in prompts])
    return score(prompts, images), prompts, images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Prompt-following accuracy of a diffusers model folder.")
    p.add_argument("model_dir", type=Path)
    p.add_argument("--n", type=int, default=100, help="number of prompts (half unseen, half seen)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("W", "H"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--grid", type=Path, default=None, help="write a contact sheet PNG here")
    p.add_argument("--json", type=Path, default=None, help="write the scores as JSON here")
    p.add_argument("--backend", choices=["engine", "diffusers"], default="engine",
                   help="engine: Kiln's ONNX package (what users get); diffusers: the PyTorch pipeline")
    p.add_argument("--target", default="cpu", help="the engine's package target: cpu or openvino")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    start = time.monotonic()
    if a.backend == "engine":
        generate = engine_generate(a.model_dir, tuple(a.size), threads=a.threads, target=a.target)
    else:
        import torch

        torch.set_num_threads(a.threads)
        generate = diffusers_generate(a.model_dir, tuple(a.size))
    scores, prompts, images = evaluate(generate, a.n)
    log.info("%d images in %.1f min", len(images), (time.monotonic() - start) / 60)
    for half, s in scores.items():
        log.info("%-6s n=%3d  colour %.3f  background %.3f  shape %.3f", half, s.n, s.colour, s.background, s.shape)
    result = {k: asdict(v) for k, v in scores.items()}
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2) + "\n")
    if a.grid:
        from PIL import Image

        a.grid.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(contact_sheet(images)).save(a.grid)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
