"""Edits in the engine: batched with everything else, and independent of what shares the batch.

An edit is a sample that starts at a later step and may carry a mask: it rides in the same UNet
calls as text-to-image samples of its latent shape, and its input is VAE-encoded with the other
edits admitted at the same boundary. Its image must not depend on its batch-mates.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.pipeline import Pipeline
from engine.request import ImageRequest

TOLERANCE = 2  # uint8 levels, the engine's parity tolerance


def picture(width: int = 64, height: int = 64) -> bytes:
    """A gradient with a red disc: something the edit visibly keeps or changes."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 160)], axis=-1).astype(np.uint8)
    rgb[(x - width // 3) ** 2 + (y - height // 3) ** 2 < (width // 6) ** 2] = (220, 30, 30)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def square_mask(width: int = 64, height: int = 64) -> bytes:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height * 3 // 4, width // 4 : width * 3 // 4] = 255  # white = repaint
    out = io.BytesIO()
    Image.fromarray(mask).save(out, format="PNG")
    return out.getvalue()


class CountingComponent:
    """Counts the calls of a real component (the VAE encoder) and passes them through."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.output_names = inner.output_names

    def run(self, feeds, fixed_dims=None):
        self.calls.append(next(iter(feeds.values())).shape[0])
        return self.inner.run(feeds, fixed_dims)


@pytest.fixture(scope="module")
def pipe(tiny_package):
    return Pipeline(tiny_package("sd1"))


def edit(**fields) -> ImageRequest:
    base = dict(prompt="the same at night", width=64, height=64, seed=5, steps=6, guidance_scale=4.0, sampler="euler_a",
                image=picture(), strength=0.6)  # fmt: skip
    return ImageRequest(**{**base, **fields})


def t2i(seed: int) -> ImageRequest:
    return ImageRequest(prompt="a blue square", width=64, height=64, seed=seed, steps=6, guidance_scale=4.0)


def test_an_edit_is_the_same_alone_and_in_a_mixed_batch(pipe):
    alone = pipe.generate([edit()])[0]
    mixed = pipe.generate([t2i(1), edit(), t2i(2), edit(mask=square_mask(), seed=9)])
    assert np.abs(mixed[1].astype(int) - alone.astype(int)).max() <= TOLERANCE


def test_an_inpainting_edit_is_the_same_alone_and_in_a_mixed_batch(pipe):
    alone = pipe.generate([edit(mask=square_mask(), sampler="ddim")])[0]
    mixed = pipe.generate([edit(strength=0.3), t2i(3), edit(mask=square_mask(), sampler="ddim")])
    assert np.abs(mixed[2].astype(int) - alone.astype(int)).max() <= TOLERANCE


def test_edits_share_the_unet_calls_of_text_to_image_samples(pipe):
    samples = pipe.prepare([t2i(1), edit(), edit(mask=square_mask())])
    assert [s.steps_done for s in samples] == [0, 0, 0]
    assert [s.total_steps for s in samples] == [6, 3, 3]  # int(6 * 0.6) = 3 steps run by the edits
    assert len({s.shape for s in samples}) == 1
    pipe.denoise_step(samples)  # one UNet call advances all three, each at its own step
    assert [s.step for s in samples] == [1, 4, 4]


def test_edits_admitted_together_are_vae_encoded_in_one_call(tiny_package):
    pipe = Pipeline(tiny_package("sd1"))
    pipe.vae_encoder = CountingComponent(pipe.vae_encoder)
    pipe.prepare([edit(seed=1), t2i(2), edit(seed=3, n=2), edit(seed=4, image=picture(96, 64), width=96)])
    assert pipe.vae_encoder.calls == [2, 1], "one call per drawn size, one row per request (its n images share it)"


def test_the_n_images_of_an_edit_differ_by_their_seeds(pipe):
    one, two = pipe.generate([edit(n=2)])
    assert np.abs(one.astype(int) - two.astype(int)).max() > TOLERANCE
    again = pipe.generate([edit(seed=6)])[0]  # image 1 of seed 5 is seed 6
    assert np.abs(two.astype(int) - again.astype(int)).max() <= TOLERANCE


def test_an_inpainting_unet_draws_text_to_image_and_edits(tiny_package):
    pipe = Pipeline(tiny_package("sd1-inpaint"))
    assert pipe.inpainting_unet and pipe.limits().inpainting_unet
    drawn, edited = pipe.generate([t2i(1), edit(mask=square_mask())])
    assert drawn.shape == edited.shape == (64, 64, 3)
    assert np.abs(drawn.astype(int) - edited.astype(int)).max() > TOLERANCE
