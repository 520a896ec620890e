"""Euler ancestral: Euler down to sigma_down, then fresh noise up to sigma_{i+1}.

The ancestral sampler of k-diffusion's `sample_euler_ancestral` (eta = 1), after Ho et al. 2020,
"Denoising Diffusion Probabilistic Models": each step removes more noise than an ODE step would
and adds back sigma_up of new Gaussian noise, so the marginal at sigma_{i+1} is unchanged.
Sigmas, timesteps and `init_noise_sigma` are those of diffusers'
`EulerAncestralDiscreteScheduler`, which equal its Euler scheduler's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.samplers.base import SamplerPlan
from engine.samplers.euler import add_noise, denoised, plan_sigmas, scale_model_input
from engine.schedules import NoiseSchedule

NAME = "euler_a"


def plan(schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """Timesteps (N,), sigmas (N+1,) ending at 0, and init_noise_sigma, as for Euler."""
    return plan_sigmas(schedule, steps, NAME)


def step(
    x: np.ndarray,
    model_output: np.ndarray,
    plan: SamplerPlan,
    i: int,
    state: Any,
    rng: np.random.Generator,
) -> tuple[np.ndarray, None]:
    """One ancestral step; draws rng.standard_normal(x.shape, float32) once, at every step.

    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2) and sigma_down = sqrt(s'^2 - sigma_up^2) = s'^2 / s
    for s = sigma_i, s' = sigma_{i+1}. The last step (s' = 0) still draws its noise, with weight 0,
    as diffusers does, so a request's random stream matches diffusers' step for step.
    """
    sigmas = plan.extra["sigmas"]
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    x = np.asarray(x, dtype=np.float32)  # (4, h, w)
    x0 = denoised(x, np.asarray(model_output, dtype=np.float32), sigma, plan.prediction_type)

    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = sigma_next**2 / sigma  # = sqrt(s'^2 - sigma_up^2), without its cancellation

    # The Euler step to sigma_down, x + (x - x0) / s * (sigma_down - s), in cancellation-free form.
    x_next = x0 + (sigma_down / sigma) * (x - x0)
    noise = rng.standard_normal(x.shape, dtype=np.float32)  # (4, h, w)
    return x_next + noise * sigma_up, None


class EulerAncestralSampler:
    """Euler ancestral (k-diffusion), as diffusers' EulerAncestralDiscreteScheduler."""

    name = NAME
    plan = staticmethod(plan)
    scale_model_input = staticmethod(scale_model_input)
    step = staticmethod(step)
    add_noise = staticmethod(add_noise)
