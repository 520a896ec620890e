"""Before the paste-back, an edit by the engine is diffusers' edit.

Same checkpoint, sampler, steps, strength, guidance, seed, input image (and mask): the engine's
img2img and inpainting images equal those of diffusers' StableDiffusionImg2ImgPipeline,
StableDiffusionInpaintPipeline (a 4-channel UNet that blends the kept region back after every
step, and a 9-channel inpainting UNet) and StableDiffusionXLImg2ImgPipeline to <= 2/255.

Every random draw of diffusers (the VAE's latent samples, the starting noise, euler_a's per-step
noise) is redirected to one numpy generator seeded as the engine seeds it, so the two agree only
if the engine draws what diffusers draws in diffusers' order (engine/edits.py documents it).
The input is exactly the requested size, so neither side resamples it; diffusers' image
processor only normalises it.
"""

from __future__ import annotations

import importlib
import io
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from engine.pipeline import ImageRequest, Pipeline  # noqa: E402
from export.diffusers_reference import reference_edit_pipeline  # noqa: E402

TOLERANCE = 2  # uint8 levels, as for text-to-image (tests/test_engine_parity.py)
WIDTH, HEIGHT = 64, 96
SAMPLERS = ("euler", "euler_a", "ddim", "dpmpp_2m_karras")
STRENGTHS = (0.3, 0.75, 1.0)  # with 6 steps: 1, 4 and 6 steps run
MASK_BOX = (16, 24, 48, 72)  # (left, top, right, bottom) of the repainted rectangle, in pixels

# Every diffusers module whose `randn_tensor` an edit reaches: the pipelines' starting noise, the
# VAE's DiagonalGaussianDistribution.sample (the input's and masked input's latent samples) and
# euler_a's per-step noise.
DRAWING_MODULES = (
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "diffusers.models.autoencoders.vae",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
)


# ---- inputs ---------------------------------------------------------------------------------


def input_rgb() -> np.ndarray:
    """A deterministic (HEIGHT, WIDTH, 3) uint8 picture: a diagonal gradient with an orange disc."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    rgb = np.stack([x / WIDTH * 200, y / HEIGHT * 180 + 40, (1 - x / WIDTH) * 220 + 20], axis=-1)
    disc = (x - 28) ** 2 + (y - 52) ** 2 < 18**2
    rgb[disc] = (240, 140, 30)
    return rgb.round().astype(np.uint8)


def mask_l() -> np.ndarray:
    """(HEIGHT, WIDTH) uint8 mask: 255 = repaint inside MASK_BOX, 0 = keep."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    left, top, right, bottom = MASK_BOX
    mask[top:bottom, left:right] = 255
    return mask


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def edit_request(family: str, sampler: str, strength: float, inpaint: bool) -> ImageRequest:
    return ImageRequest(
        prompt="a red circle on a blue background",
        negative_prompt="" if family == "sdxl" else "blurry",
        width=WIDTH,
        height=HEIGHT,
        seed=1234,
        steps=6,
        guidance_scale=5.0,
        sampler=sampler,
        image=png(input_rgb()),
        mask=png(mask_l()) if inpaint else None,
        strength=strength,
    )


# ---- the two sides --------------------------------------------------------------------------

_engines: dict[str, Pipeline] = {}


def engine_image(package, req: ImageRequest, paste_back: bool = False) -> np.ndarray:
    key = str(package)
    if key not in _engines:
        _engines[key] = Pipeline(package)
    return _engines[key].generate([req], paste_back=paste_back)[0]


@lru_cache(maxsize=None)
def _reference(checkpoint: str, sampler: str, kind: str):
    return reference_edit_pipeline(checkpoint, sampler, kind)


def diffusers_image(checkpoint, req: ImageRequest, monkeypatch) -> np.ndarray:
    """diffusers' edit of `req`, its random draws taken from the engine's generator for the seed."""
    kind = "inpaint" if req.mask is not None else "img2img"
    pipe = _reference(str(checkpoint), req.sampler, kind)
    rng = np.random.Generator(np.random.PCG64(req.seed))  # the engine's seed rule

    def numpy_randn(shape, generator=None, device=None, dtype=None, **_):
        # diffusers' shapes carry a leading batch dimension of 1: the same numbers as the engine's
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype or torch.float32)

    for name in DRAWING_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", numpy_randn)
    kwargs = {}
    if kind == "inpaint":
        kwargs.update(mask_image=Image.fromarray(mask_l(), mode="L"), height=req.height, width=req.width)
    with torch.no_grad():
        out = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            image=Image.fromarray(input_rgb()),
            strength=req.strength,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            output_type="np",
            **kwargs,
        ).images[0]
    return (out * 255).round().astype(np.uint8)


def assert_same_edit(ours: np.ndarray, theirs: np.ndarray, label: str) -> None:
    assert ours.shape == theirs.shape == (HEIGHT, WIDTH, 3)
    diff = int(np.abs(ours.astype(int) - theirs.astype(int)).max())
    print(f"{label}: max abs difference {diff}")
    assert diff <= TOLERANCE, f"{label}: max abs difference {diff} > {TOLERANCE} levels"
    assert np.abs(ours.astype(int) - input_rgb().astype(int)).max() > TOLERANCE  # the edit did something


# ---- the cases ------------------------------------------------------------------------------

GRID = [(sampler, strength) for sampler in SAMPLERS for strength in STRENGTHS]


def compare(family: str, sampler: str, strength: float, inpaint: bool, label: str, checkpoints, packages, monkeypatch) -> None:
    req = edit_request(family, sampler, strength, inpaint=inpaint)
    ours = engine_image(packages(family), req)
    theirs = diffusers_image(checkpoints(family), req, monkeypatch)
    assert_same_edit(ours, theirs, f"{label} {sampler} {strength}")


@pytest.mark.parametrize("sampler,strength", GRID)
def test_sd1_img2img_matches_diffusers(sampler, strength, tiny_checkpoint, tiny_package, monkeypatch):
    compare("sd1", sampler, strength, False, "sd1 img2img", tiny_checkpoint, tiny_package, monkeypatch)


@pytest.mark.parametrize("sampler,strength", GRID)
def test_sd1_inpaint_with_a_plain_unet_matches_diffusers(sampler, strength, tiny_checkpoint, tiny_package, monkeypatch):
    """A 4-channel UNet: the kept region is reset to the noised input after every step."""
    compare("sd1", sampler, strength, True, "sd1 inpaint (4-channel)", tiny_checkpoint, tiny_package, monkeypatch)


@pytest.mark.parametrize("sampler,strength", GRID)
def test_sd1_inpaint_with_an_inpainting_unet_matches_diffusers(
    sampler, strength, tiny_checkpoint, tiny_package, monkeypatch
):
    """A 9-channel UNet: the mask and masked input's latents are UNet inputs at every step."""
    compare("sd1-inpaint", sampler, strength, True, "sd1-inpaint (9-channel)", tiny_checkpoint, tiny_package, monkeypatch)


@pytest.mark.parametrize("sampler,strength", GRID)
def test_sdxl_img2img_matches_diffusers(sampler, strength, tiny_checkpoint, tiny_package, monkeypatch):
    compare("sdxl", sampler, strength, False, "sdxl img2img", tiny_checkpoint, tiny_package, monkeypatch)


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_v_prediction_img2img_matches_diffusers(sampler, tiny_checkpoint, tiny_package, monkeypatch):
    compare("sd2v", sampler, 0.75, False, "sd2v img2img", tiny_checkpoint, tiny_package, monkeypatch)


def test_paste_back_keeps_the_input_outside_the_mask_and_the_edit_inside(tiny_package):
    """Pixels over 8 px (twice the feather) outside the mask are the input, bit for bit; pixels
    over 4 px (the feather) inside it are the un-pasted edit, bit for bit."""
    req = edit_request("sd1", "euler", 0.75, inpaint=True)
    pasted = engine_image(tiny_package("sd1"), req, paste_back=True)
    unpasted = engine_image(tiny_package("sd1"), req, paste_back=False)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    left, top, right, bottom = MASK_BOX
    # Chebyshev distance outside the box (0 inside) and inside it (0 outside)
    outside = np.maximum.reduce([left - x, x - (right - 1), top - y, y - (bottom - 1), np.zeros_like(x)])
    inside = np.minimum.reduce([x - left, right - 1 - x, y - top, bottom - 1 - y])
    far_outside, deep_inside = outside > 8, inside > 4
    assert far_outside.any() and deep_inside.any()
    np.testing.assert_array_equal(pasted[far_outside], input_rgb()[far_outside])
    np.testing.assert_array_equal(pasted[deep_inside], unpasted[deep_inside])
    assert (unpasted[far_outside] != input_rgb()[far_outside]).any()  # so the paste-back did something
