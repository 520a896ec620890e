"""Euler: the first-order ODE solver of Karras et al. 2022 on the variance-exploding sigma scale.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Algorithm 1 without churn, in k-diffusion's `sample_euler` form; the sigmas, timesteps and
`init_noise_sigma` are those of diffusers' `EulerDiscreteScheduler` (linear interpolation, no
Karras sigmas, final sigma 0).

The latents are kept on the VE scale, x = x0 + sigma * eps, which is what diffusers' Euler
pipelines hold: the UNet sees x / sqrt(sigma^2 + 1), and after the last step (sigma = 0) x is
the clean latent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.samplers.base import SamplerPlan
from engine.schedules import NoiseSchedule, check_steps, readonly, spaced_timesteps

NAME = "euler"


def plan_sigmas(schedule: NoiseSchedule, steps: int, name: str = NAME) -> SamplerPlan:
    """The plan diffusers' Euler schedulers make: timesteps, sigmas (N+1,) and init_noise_sigma.

    A config without `timestep_spacing` gets "linspace", the Euler schedulers' default, even when
    the same config gives DDIM "leading" (as SD 1.5's PNDM config does).
    """
    check_steps(steps, schedule.num_train_timesteps, name)
    spacing = schedule.timestep_spacing or "linspace"
    timesteps = spaced_timesteps(
        schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, round_linspace=False
    ).astype(np.float32)  # (N,)
    train_sigmas = schedule.train_sigmas()  # (T,) float32
    sigmas = np.interp(timesteps, np.arange(schedule.num_train_timesteps), train_sigmas)
    sigmas = np.append(sigmas, 0.0).astype(np.float32)  # (N+1,), ends at 0
    sigma_max = sigmas.max()
    # x_t = x0 + sigma eps has std sqrt(sigma^2 + 1) for unit-variance x0; diffusers scales the
    # starting noise by that for "leading" spacing but by sigma_max alone for the others.
    init = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    return SamplerPlan(
        sampler=name,
        prediction_type=schedule.prediction_type,
        timesteps=readonly(timesteps),
        init_noise_sigma=float(init),
        extra={"sigmas": readonly(sigmas)},
    )


def scale_model_input(x: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """x: (4, h, w) VE latents -> x / sqrt(sigma_i^2 + 1), the unit-variance UNet input."""
    sigma = plan.extra["sigmas"][i]
    return x / ((sigma**2 + 1) ** 0.5)


def denoised(
    x: np.ndarray, model_output: np.ndarray, sigma: np.float32, prediction_type: str
) -> np.ndarray:
    """The x0 estimate from the UNet output at noise level sigma; (4, h, w) float32.

    epsilon: x0 = x - sigma eps. v-prediction (Salimans & Ho 2022, "Progressive Distillation",
    on the VE scale): x0 = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1).
    """
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not one of 'epsilon', 'v_prediction'")


def step(
    x: np.ndarray,
    model_output: np.ndarray,
    plan: SamplerPlan,
    i: int,
    state: Any,
    rng: np.random.Generator,
) -> tuple[np.ndarray, None]:
    """One Euler step of dx/dsigma = (x - x0) / sigma from sigma_i to sigma_{i+1}; draws no noise.

    x + (x - x0) / s * (s' - s) is evaluated as x0 + (s'/s) (x - x0): the same number, but
    without float32 cancellation between x ~ s eps and the update when s is large (4096 under
    zero terminal SNR), where diffusers' literal form loses ~1e-3.
    """
    sigmas = plan.extra["sigmas"]
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = np.asarray(x, dtype=np.float32)  # (4, h, w)
    x0 = denoised(x, np.asarray(model_output, dtype=np.float32), sigma, plan.prediction_type)
    return x0 + (sigma_next / sigma) * (x - x0), None


def add_noise(x0: np.ndarray, noise: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """Clean latents (4, h, w) noised to step i's level, x0 + sigma_i noise (diffusers' `add_noise`
    on the VE scale): where an edit starts, and what inpainting blends the kept region with."""
    return (x0 + noise * plan.extra["sigmas"][i]).astype(np.float32)


class EulerSampler:
    """Euler (Karras et al. 2022, Algorithm 1), as diffusers' EulerDiscreteScheduler."""

    name = NAME
    plan = staticmethod(plan_sigmas)
    scale_model_input = staticmethod(scale_model_input)
    step = staticmethod(step)
    add_noise = staticmethod(add_noise)
