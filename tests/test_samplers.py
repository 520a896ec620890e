"""Kiln's samplers against diffusers' schedulers: stored schedules, whole trajectories, guidance.

diffusers (torch) is the reference here only; the engine itself never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from engine.errors import InvalidRequestError, UnknownSamplerError
from engine.guidance import apply_guidance
from engine.samplers import SAMPLERS, get_sampler
from engine.schedules import NoiseSchedule

# diffusers' np.array(tensor) calls warn under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Stable Diffusion 1.5's scheduler/config.json (a PNDM config: no timestep_spacing key).
SD15 = json.loads((Path(__file__).resolve().parents[1] / "export/architectures/sd15/scheduler/config.json").read_text())
CONFIGS = {
    "sd15": SD15,
    # SD 2.1-768's config: SD 1.5's with v-prediction.
    "sd21": {**SD15, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    # Lin et al. 2023's recommended setup.
    "zsnr": {
        **SD15,
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
    },
}
DIFFUSERS = {
    "euler": EulerDiscreteScheduler.from_config,
    "euler_a": EulerAncestralDiscreteScheduler.from_config,
    "ddim": DDIMScheduler.from_config,
    "dpmpp_2m_karras": lambda cfg: DPMSolverMultistepScheduler.from_config(
        cfg, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
    ),
    "lcm": LCMScheduler.from_config,
}
SHAPE = (4, 8, 8)  # one sample's latents
CONST = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)


def fake_unet(x_in: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the guided UNet output at (x_in, t), in x_in's dtype."""
    return 0.3 * x_in + np.sin(t / 100.0) * CONST.astype(x_in.dtype)


def diffusers_trajectory(monkeypatch, sampler, config, steps, noise, seed, float64=False):
    """Final latents of diffusers' scheduler loop, run as StableDiffusionPipeline runs it.

    Every randn_tensor the scheduler draws comes from numpy, as ours do. With float64=True the
    latents, model outputs and scheduler tables are float64: diffusers' algorithm without its
    float32 rounding, which at sigma = 4096 (zero terminal SNR) is itself ~1e-4.
    """
    rng = np.random.default_rng(seed)
    dtype = np.float64 if float64 else np.float32

    def randn(shape, *args, **kwargs):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32).astype(dtype))

    monkeypatch.setattr(scheduling_euler_ancestral_discrete, "randn_tensor", randn)
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", randn)
    scheduler = DIFFUSERS[sampler](config)
    scheduler.set_timesteps(steps)
    if float64:
        for name in ("sigmas", "alphas_cumprod", "final_alpha_cumprod"):
            if isinstance(getattr(scheduler, name, None), torch.Tensor):
                setattr(scheduler, name, getattr(scheduler, name).double())
    latents = torch.from_numpy(noise.astype(dtype)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(latents, t)
        model_output = torch.from_numpy(fake_unet(x_in.numpy(), float(t)))
        latents = scheduler.step(model_output, t, latents, return_dict=False)[0]
    return scheduler.timesteps.numpy(), latents.numpy()


def kiln_trajectory(sampler, config, steps, noise, seed):
    """Final latents of our loop, exactly as Kiln's pipeline runs it."""
    s = get_sampler(sampler)
    plan = s.plan(NoiseSchedule.from_scheduler_config(config), steps)
    rng = np.random.default_rng(seed)
    x, state = noise * plan.init_noise_sigma, None  # (4, h, w) float32
    for i in range(plan.num_steps):
        model_output = fake_unet(s.scale_model_input(x, plan, i), float(plan.timesteps[i]))
        x, state = s.step(x, model_output, plan, i, state, rng)
    return plan.timesteps, x


@pytest.mark.parametrize("steps", [1, 2, 4, 20])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_trajectory_matches_diffusers(monkeypatch, sampler, config, steps):
    noise = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    ref_t, ref32 = diffusers_trajectory(monkeypatch, sampler, CONFIGS[config], steps, noise, 7)
    _, ref64 = diffusers_trajectory(monkeypatch, sampler, CONFIGS[config], steps, noise, 7, True)
    timesteps, ours = kiln_trajectory(sampler, CONFIGS[config], steps, noise, 7)

    np.testing.assert_array_equal(timesteps, ref_t.astype(np.float32))
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    assert np.abs(ours - ref64).max() < 1e-4
    # Against diffusers' own float32 run, allow its rounding error on top.
    assert np.abs(ours - ref32).max() < 1e-4 + np.abs(ref32 - ref64).max()


# (sampler, config, steps): timesteps[0], timesteps[1], timesteps[-1], then the schedule value at
# steps 0, 1 and N-1 (sigma for Euler/DPM samplers, alphas_cumprod[t] for DDIM/LCM), and
# init_noise_sigma; taken from diffusers 0.39's schedulers.
GOLDEN = {
    ("euler", "sd15", 4): (999, 666, 0, 14.614647, 2.9183085, 0.029167535, 14.614647),
    ("euler", "sd15", 20): (999, 946.42108, 0, 14.614647, 10.74685, 0.029167535, 14.614647),
    ("euler_a", "sd15", 4): (999, 666, 0, 14.614647, 2.9183085, 0.029167535, 14.614647),
    ("euler_a", "sd15", 20): (999, 946.42108, 0, 14.614647, 10.74685, 0.029167535, 14.614647),
    ("ddim", "sd15", 4): (751, 501, 1, 0.055718984, 0.27499884, 0.99829602, 1),
    ("ddim", "sd15", 20): (951, 901, 1, 0.0081549985, 0.014004889, 0.99829602, 1),
    ("dpmpp_2m_karras", "sd15", 4): (999, 687, 0, 14.614647, 3.168611, 0.029167535, 1),
    ("dpmpp_2m_karras", "sd15", 20): (999, 962, 0, 14.614647, 11.725372, 0.029167535, 1),
    ("lcm", "sd15", 4): (999, 759, 259, 0.0046600951, 0.05221289, 0.65897524, 1),
    ("lcm", "sd15", 20): (999, 959, 59, 0.0046600951, 0.0074495859, 0.9419623, 1),
    ("euler", "zsnr", 4): (999, 749, 249, 4096, 5.3987408, 0.72705609, 4096),
    ("euler", "zsnr", 20): (999, 949, 49, 4096, 40.392345, 0.23120026, 4096),
    ("euler_a", "zsnr", 4): (999, 749, 249, 4096, 5.3987408, 0.72705609, 4096),
    ("euler_a", "zsnr", 20): (999, 949, 49, 4096, 40.392345, 0.23120026, 4096),
    ("ddim", "zsnr", 4): (999, 749, 249, 0, 0.033171453, 0.65418887, 1),
    ("ddim", "zsnr", 20): (999, 949, 49, 0, 0.0006125418, 0.94925874, 1),
    ("dpmpp_2m_karras", "zsnr", 4): (999, 994, 0, 4096, 443.79233, 0.029167535, 1),
    ("dpmpp_2m_karras", "zsnr", 20): (999, 998, 0, 4096, 3012.3035, 0.029167535, 1),
    ("lcm", "zsnr", 4): (999, 759, 259, 0, 0.029577747, 0.63681537, 1),
    ("lcm", "zsnr", 20): (999, 959, 59, 0, 0.00037515315, 0.93783671, 1),
}


def schedule_summary(timesteps, values, init_noise_sigma):
    t = np.asarray(timesteps, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return (t[0], t[1], t[-1], v[0], v[1], v[len(t) - 1], float(init_noise_sigma))


@pytest.mark.parametrize("key", list(GOLDEN))
def test_schedule_matches_stored_golden_numbers(key):
    sampler, config, steps = key
    plan = get_sampler(sampler).plan(NoiseSchedule.from_scheduler_config(CONFIGS[config]), steps)
    scheduler = DIFFUSERS[sampler](CONFIGS[config])
    scheduler.set_timesteps(steps)
    if sampler in ("ddim", "lcm"):
        ours = plan.extra["alphas"]
        theirs = scheduler.alphas_cumprod.numpy()[scheduler.timesteps.numpy()]
    else:
        ours, theirs = plan.extra["sigmas"], scheduler.sigmas.numpy()
    golden = np.array(GOLDEN[key])
    kiln = np.array(schedule_summary(plan.timesteps, ours, plan.init_noise_sigma))
    reference = np.array(
        schedule_summary(scheduler.timesteps.numpy(), theirs, scheduler.init_noise_sigma)
    )
    np.testing.assert_allclose(kiln, golden, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(reference, golden, rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_samples_at_different_steps_do_not_share_state(sampler):
    s = get_sampler(sampler)
    plans = {
        "a": s.plan(NoiseSchedule.from_scheduler_config(CONFIGS["sd15"]), 6),
        "b": s.plan(NoiseSchedule.from_scheduler_config(CONFIGS["zsnr"]), 4),
    }
    seeds = {"a": 11, "b": 12}

    def start(name):
        noise = np.random.default_rng(seeds[name] + 100).standard_normal(SHAPE, dtype=np.float32)
        return {"x": noise * plans[name].init_noise_sigma, "state": None, "i": 0,
                "rng": np.random.default_rng(seeds[name])}

    def advance(sample, plan):
        x_before = sample["x"].copy()
        out = fake_unet(s.scale_model_input(sample["x"], plan, sample["i"]),
                        float(plan.timesteps[sample["i"]]))
        sample["x"], sample["state"] = s.step(sample["x"], out, plan, sample["i"],
                                              sample["state"], sample["rng"])
        sample["i"] += 1
        return x_before

    alone = {}
    for name, plan in plans.items():
        sample = start(name)
        while sample["i"] < plan.num_steps:
            advance(sample, plan)
        alone[name] = sample["x"]

    together = {name: start(name) for name in plans}
    for name in ["a", "b", "b", "a", "a", "b", "a", "b", "a", "a"]:
        sample = together[name]
        x_before = sample["x"].copy()
        kept = advance(sample, plans[name])
        np.testing.assert_array_equal(kept, x_before)  # step never writes into its input
    for name in plans:
        np.testing.assert_array_equal(together[name]["x"], alone[name])


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_guidance_matches_diffusers_cfg_and_rescale(guidance_rescale):
    rng = np.random.default_rng(3)
    uncond = rng.standard_normal(SHAPE, dtype=np.float32)
    cond = (uncond + 0.5 * rng.standard_normal(SHAPE, dtype=np.float32)).astype(np.float32)
    u, c = torch.from_numpy(uncond[None]), torch.from_numpy(cond[None])  # (1, 4, h, w)
    expected = u + 7.5 * (c - u)
    if guidance_rescale > 0:
        expected = rescale_noise_cfg(expected, c, guidance_rescale=guidance_rescale)
    ours = apply_guidance(uncond, cond, 7.5, guidance_rescale)
    assert ours.dtype == np.float32 and ours.shape == SHAPE
    np.testing.assert_allclose(ours, expected[0].numpy(), atol=1e-5, rtol=1e-5)


def test_guidance_scale_at_most_one_returns_cond():
    cond = np.ones(SHAPE, dtype=np.float32)
    assert apply_guidance(None, cond, 1.0, 0.7) is cond
    assert apply_guidance(np.zeros(SHAPE, np.float32), cond, 0.5) is cond


def test_guidance_rescale_out_of_range_is_refused():
    x = np.ones(SHAPE, dtype=np.float32)
    with pytest.raises(ValueError, match="guidance_rescale"):
        apply_guidance(x, x, 7.5, 1.5)


def test_registry_names():
    assert set(SAMPLERS) == {"euler", "euler_a", "ddim", "dpmpp_2m_karras", "lcm"}
    for name, sampler in SAMPLERS.items():
        assert sampler.name == name and get_sampler(name) is sampler


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(UnknownSamplerError) as err:
        get_sampler("heun")
    assert err.value.param == "sampler"
    for name in SAMPLERS:
        assert name in str(err.value)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("steps", [0, 1001])
def test_step_count_out_of_range_is_refused(sampler, steps):
    schedule = NoiseSchedule.from_scheduler_config(SD15)
    with pytest.raises(InvalidRequestError) as err:
        get_sampler(sampler).plan(schedule, steps)
    assert err.value.param == "steps"


def test_lcm_refuses_more_steps_than_its_distillation_schedule():
    schedule = NoiseSchedule.from_scheduler_config(SD15)
    assert get_sampler("lcm").plan(schedule, 50).num_steps == 50
    with pytest.raises(InvalidRequestError, match="1 to 50"):
        get_sampler("lcm").plan(schedule, 51)


@pytest.mark.parametrize("sampler", ["ddim", "lcm"])
def test_epsilon_model_cannot_start_at_zero_snr_with_alpha_based_samplers(sampler):
    config = {**CONFIGS["zsnr"], "prediction_type": "epsilon"}
    schedule = NoiseSchedule.from_scheduler_config(config)
    with pytest.raises(InvalidRequestError) as err:
        get_sampler(sampler).plan(schedule, 4)
    assert err.value.param == "sampler"
    assert get_sampler("euler").plan(schedule, 4).init_noise_sigma == pytest.approx(4096, rel=1e-6)


def test_engine_samplers_do_not_import_torch():
    code = (
        "import sys, engine.samplers, engine.schedules, engine.guidance; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
