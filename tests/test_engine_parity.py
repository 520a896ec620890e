"""The engine draws the same image as the diffusers PyTorch pipeline.

Same checkpoint, sampler, steps, guidance, seed and size; diffusers is given the latents that the
engine's documented seed rule makes (torch cannot reproduce numpy's generator, so the rule is
ours). Ancestral samplers draw fresh noise every step: diffusers' draws are redirected to the
same numpy generator, in the same order.

Tolerance: max abs difference <= 2/255 on uint8 pixels (onnxruntime and PyTorch order floating
point sums differently; with these tiny random models the difference seen is 0 or 1 level).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from engine.pipeline import ImageRequest, Pipeline, initial_noise  # noqa: E402
from export.diffusers_reference import reference_pipeline  # noqa: E402

TOLERANCE = 2  # uint8 levels

# Modules whose `randn_tensor` draws the per-step noise of ancestral / multistep-noise samplers.
NOISY = {
    "euler_a": "diffusers.schedulers.scheduling_euler_ancestral_discrete",
    "lcm": "diffusers.schedulers.scheduling_lcm",
}


def diffusers_image(checkpoint, sampler, req: ImageRequest, monkeypatch) -> np.ndarray:
    pipe = reference_pipeline(checkpoint, sampler)
    noise, rng = initial_noise(req.seed, (4, req.height // 8, req.width // 8))
    if sampler in NOISY:
        import importlib

        module = importlib.import_module(NOISY[sampler])

        def numpy_randn(shape, generator=None, device=None, dtype=None, **_):
            return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

        monkeypatch.setattr(module, "randn_tensor", numpy_randn)
    kwargs = {}
    if req.guidance_rescale:
        kwargs["guidance_rescale"] = req.guidance_rescale
    return run_diffusers(pipe, req, noise, **kwargs)


def run_diffusers(pipe, req: ImageRequest, noise: np.ndarray, **kwargs) -> np.ndarray:
    """diffusers' image for `req` from the engine's starting noise, as (H, W, 3) uint8."""
    with torch.no_grad():
        out = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            width=req.width,
            height=req.height,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            latents=torch.from_numpy(noise[None]),
            output_type="np",
            **kwargs,
        ).images[0]
    return (out * 255).round().astype(np.uint8)


CASES = [
    ("sd1", "euler"),
    ("sd1", "euler_a"),
    ("sd1", "ddim"),
    ("sd1", "dpmpp_2m_karras"),
    ("sd1", "lcm"),
    ("sd2v", "euler"),
    ("sd2v", "ddim"),
    ("sd2v", "dpmpp_2m_karras"),
    ("sdxl", "euler"),
    ("sdxl", "ddim"),
]


@pytest.mark.parametrize("family,sampler", CASES)
def test_engine_matches_diffusers(family, sampler, tiny_checkpoint, tiny_package, monkeypatch):
    steps = 4 if sampler == "lcm" else 6
    req = ImageRequest(
        prompt="a red circle on a blue background",
        negative_prompt="blurry" if family != "sdxl" else "",
        width=64,
        height=96,
        seed=1234,
        steps=steps,
        guidance_scale=5.0,
        guidance_rescale=0.7 if family == "sd2v" else 0.0,
        sampler=sampler,
    )
    ours = Pipeline(tiny_package(family)).generate([req])[0]
    theirs = diffusers_image(tiny_checkpoint(family), sampler, req, monkeypatch)
    assert ours.shape == theirs.shape == (96, 64, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= TOLERANCE, f"max abs difference {diff} > {TOLERANCE} levels"
    assert ours.std() > 0  # not a flat image: the comparison means something


def test_sizes_that_are_multiples_of_8_only_match_too(tiny_checkpoint, tiny_package, monkeypatch):
    """72x88 pixels = 9x11 latents, not divisible by the UNet's downsampling: still diffusers' image."""
    req = ImageRequest(prompt="a purple star", width=72, height=88, seed=3, steps=4, guidance_scale=4.0, sampler="euler")
    ours = Pipeline(tiny_package("sd1")).generate([req])[0]
    theirs = diffusers_image(tiny_checkpoint("sd1"), "euler", req, monkeypatch)
    assert ours.shape == theirs.shape == (88, 72, 3)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= TOLERANCE
