"""One request type, validated in one place: what `validate_request` refuses, and why."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError, UnknownSamplerError
from engine.request import ImageRequest, ModelLimits, edit_steps, steps_run, validate_request
from engine.shapes import fit_size

LIMITS = ModelLimits(name="m", max_n=4, max_steps=50, samplers=("ddim", "euler"), edits=True, max_prompt_chars=100)


def refused(param: str, **fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        validate_request(ImageRequest(**{"prompt": "a cat", **fields}), LIMITS)
    assert info.value.param == param, str(info.value)
    return info.value


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x" * 101}, "prompt"),
        ({"negative_prompt": "x" * 101}, "negative_prompt"),
        ({"n": 0}, "n"),
        ({"n": 5}, "n"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"guidance_rescale": 1.5}, "guidance_rescale"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
        ({"preview_every": -1}, "preview_every"),
        ({"width": 64}, "size"),
        ({"width": 65, "height": 64}, "size"),
        ({"width": 4096, "height": 64}, "size"),
        ({"mask": b"m"}, "mask"),
        ({"strength": 0.5}, "strength"),
        ({"image": b"i", "strength": 0.0}, "strength"),
        ({"image": b"i", "strength": 1.5}, "strength"),
        ({"image": b"i", "strength": 0.1, "steps": 5}, "strength"),  # int(5 * 0.1) = 0 steps
    ],
)
def test_each_bad_field_is_named(fields, param):
    refused(param, **fields)


def test_an_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(UnknownSamplerError, match="ddim, euler"):
        validate_request(ImageRequest(prompt="a", sampler="heun"), LIMITS)


def test_a_model_without_a_vae_encoder_refuses_edits():
    limits = ModelLimits(name="old", edits=False)
    with pytest.raises(InvalidRequestError, match="no VAE encoder") as info:
        validate_request(ImageRequest(prompt="a", image=b"png"), limits)
    assert info.value.param == "image"


def test_an_inpainting_model_needs_a_mask():
    limits = ModelLimits(name="inpaint", edits=True, inpainting_unet=True)
    with pytest.raises(InvalidRequestError) as info:
        validate_request(ImageRequest(prompt="a", image=b"png"), limits)
    assert info.value.param == "mask"


def test_an_edit_may_have_no_prompt():
    validate_request(ImageRequest(prompt="", image=b"png", strength=0.7), LIMITS)  # a variation


def test_edits_run_diffusers_share_of_the_schedule():
    assert edit_steps(20, 0.6) == (8, 12)
    assert edit_steps(6, 0.3) == (5, 1)  # int(1.8) = 1
    assert edit_steps(6, 1.0) == (0, 6)
    assert steps_run(ImageRequest(prompt="a", steps=20, image=b"i", strength=0.5)) == 10
    assert steps_run(ImageRequest(prompt="a", steps=20)) == 20


def test_the_front_end_caps_but_never_raises_the_workers_limits():
    capped = LIMITS.capped(max_n=128, max_steps=10, max_prompt_chars=4000, max_side=256)
    assert (capped.max_n, capped.max_steps, capped.max_prompt_chars, capped.max_side) == (4, 10, 100, 256)


@pytest.mark.parametrize(
    "size, expected",
    [
        ((512, 512), (512, 512)),
        ((4000, 3000), (512, 384)),  # a photo: edited at the model's default scale
        ((100, 100), (96, 96)),
        ((30, 20), (96, 64)),  # small: scaled up to min_side
    ],
)
def test_an_edit_without_a_size_takes_the_inputs_fitted_to_the_model(size, expected):
    assert fit_size(*size, ModelLimits(name="m", default_size="512x512")) == expected


@pytest.mark.parametrize("size", [(5000, 60), (8, 300)])
def test_an_input_no_allowed_size_resembles_is_refused(size):
    with pytest.raises(InvalidRequestError) as info:
        fit_size(*size, ModelLimits(name="m"))
    assert info.value.param == "image"
