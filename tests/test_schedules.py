"""NoiseSchedule.from_scheduler_config against diffusers' own beta and alpha tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from engine.schedules import NoiseSchedule, spaced_timesteps

SD15 = json.loads((Path(__file__).resolve().parents[1] / "export/architectures/sd15/scheduler/config.json").read_text())


@pytest.mark.parametrize(
    "config",
    [
        SD15,
        {**SD15, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {**SD15, "beta_schedule": "squaredcos_cap_v2"},
        {**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
        {**SD15, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()},
    ],
    ids=["scaled_linear", "linear", "squaredcos_cap_v2", "zero_snr", "trained_betas"],
)
def test_alphas_cumprod_matches_diffusers(config):
    schedule = NoiseSchedule.from_scheduler_config(config)
    reference = DDIMScheduler.from_config(config).alphas_cumprod.numpy().astype(np.float64)
    assert schedule.alphas_cumprod.dtype == np.float64
    assert schedule.alphas_cumprod.shape == (1000,)
    assert not schedule.alphas_cumprod.flags.writeable
    # float32 arithmetic as in diffusers; torch.linspace rounds the odd beta one ulp apart, and the
    # zero-SNR shift cancels float32 digits near t = T-1 (absolute error ~1e-10 in both).
    np.testing.assert_allclose(schedule.alphas_cumprod, reference, rtol=2e-6, atol=1e-9)


def test_zero_terminal_snr_keeps_exact_zero_and_sigma_max_4096():
    config = {**SD15, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
    schedule = NoiseSchedule.from_scheduler_config(config)
    assert schedule.alphas_cumprod[-1] == 0.0  # what DDIM and LCM index
    sigmas = schedule.train_sigmas()  # what Euler and DPM-Solver interpolate
    reference = EulerDiscreteScheduler.from_config(config).sigmas.numpy()[::-1][1:]
    # float32 cancellation at both ends, in diffusers as here: 1 - a_t at small t, and the
    # zero-SNR shift near t = T-1.
    np.testing.assert_allclose(sigmas, reference, rtol=3e-5)
    assert sigmas[-1] == pytest.approx(4096.0, rel=1e-7)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("prediction_type", "sample", "prediction_type 'sample' is not supported"),
        ("prediction_type", "flow_prediction", "prediction_type"),
        ("beta_schedule", "sigmoid", "beta_schedule 'sigmoid'"),
        ("timestep_spacing", "karras", "timestep_spacing 'karras'"),
        ("thresholding", True, "thresholding"),
        ("num_train_timesteps", 0, "num_train_timesteps"),
        ("steps_offset", -1, "steps_offset"),
        ("trained_betas", [0.1, 0.2], "trained_betas"),
        ("original_inference_steps", 2000, "original_inference_steps"),
    ],
)
def test_unsupported_config_is_refused_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        NoiseSchedule.from_scheduler_config({**SD15, key: value})


def test_config_defaults_are_left_to_each_sampler():
    schedule = NoiseSchedule.from_scheduler_config(SD15)
    assert schedule.timestep_spacing is None  # Euler reads linspace, DDIM leading
    assert schedule.prediction_type == "epsilon" and schedule.steps_offset == 1
    assert schedule.set_alpha_to_one is False and schedule.clip_sample is False


@pytest.mark.parametrize("steps", [1, 3, 4, 20, 61, 103])
def test_trailing_spacing_gives_exactly_n_timesteps(steps):
    ours = spaced_timesteps(1000, steps, "trailing", 0, round_linspace=True)
    diffusers_like = np.round(np.arange(1000, 0, -1000 / steps)) - 1
    assert ours.shape == (steps,) and ours.min() >= 0
    # For 61 and 103 steps, diffusers' arange has an extra timestep -1 at the end.
    np.testing.assert_array_equal(ours, diffusers_like[:steps])
