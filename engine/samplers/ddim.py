"""DDIM: the deterministic (eta = 0) sampler of Song et al. 2021.

Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma_t = 0:

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,

with x0 and eps recovered from the UNet output. Timesteps, the previous-step rule and the final
alpha are those of diffusers' `DDIMScheduler` at eta = 0, the StableDiffusionPipeline default.
The latents stay on the variance-preserving scale, so `init_noise_sigma` is 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import InvalidRequestError
from engine.samplers.base import SamplerPlan
from engine.schedules import NoiseSchedule, check_steps, readonly, spaced_timesteps

NAME = "ddim"


def plan(schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """Integer timesteps (N,) and the cumulative alphas at t and at the step's "previous" t.

    Quirks kept from diffusers: a config without `timestep_spacing` gets "leading"; the previous
    timestep is always t - T // N, even where linspace or trailing spacing puts the next
    timestep elsewhere; below t = 0 the previous alpha is 1 if `set_alpha_to_one` (default true)
    else alphas_cumprod[0]; under zero terminal SNR alphas_cumprod[T-1] stays exactly 0.
    """
    check_steps(steps, schedule.num_train_timesteps, NAME)
    spacing = schedule.timestep_spacing or "leading"
    timesteps = spaced_timesteps(
        schedule.num_train_timesteps, steps, spacing, schedule.steps_offset, round_linspace=True
    ).astype(np.int64)  # (N,)
    if timesteps[0] >= schedule.num_train_timesteps:
        raise InvalidRequestError(
            f"steps={steps} with leading spacing and steps_offset={schedule.steps_offset} would "
            f"start at timestep {timesteps[0]}, past the model's last timestep "
            f"{schedule.num_train_timesteps - 1}; use fewer steps",
            param="steps",
        )
    ac = schedule.alphas_cumprod_f32()  # (T,)
    set_alpha_to_one = True if schedule.set_alpha_to_one is None else schedule.set_alpha_to_one
    final_alpha = np.float32(1.0) if set_alpha_to_one else ac[0]
    prev = timesteps - schedule.num_train_timesteps // steps
    alpha = ac[timesteps]  # (N,) float32
    alpha_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final_alpha).astype(np.float32)
    if schedule.prediction_type == "epsilon" and alpha[0] == 0.0:
        raise InvalidRequestError(
            f"sampler 'ddim' cannot start at zero SNR (timestep {timesteps[0]}) with an epsilon "
            "model: x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero; use sampler 'euler', "
            "'euler_a' or 'dpmpp_2m_karras', which start from sigma 4096 instead",
            param="sampler",
        )
    # DDIMScheduler's default clip_sample is true; every SD config says false.
    clip_sample = True if schedule.clip_sample is None else schedule.clip_sample
    return SamplerPlan(
        sampler=NAME,
        prediction_type=schedule.prediction_type,
        timesteps=readonly(timesteps.astype(np.float32)),
        init_noise_sigma=1.0,
        extra={
            "alphas": readonly(alpha),
            "alphas_prev": readonly(alpha_prev),
            "clip_range": schedule.clip_sample_range if clip_sample else None,
        },
    )


def scale_model_input(x: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """DDIM feeds the VP-scale latents to the UNet unchanged."""
    return x


def step(
    x: np.ndarray,
    model_output: np.ndarray,
    plan: SamplerPlan,
    i: int,
    state: Any,
    rng: np.random.Generator,
) -> tuple[np.ndarray, None]:
    """One DDIM step (eta = 0) from timestep t_i to t_i - T // N; draws no noise."""
    alpha, alpha_prev = plan.extra["alphas"][i], plan.extra["alphas_prev"][i]
    beta = 1 - alpha
    x = np.asarray(x, dtype=np.float32)  # (4, h, w)
    out = np.asarray(model_output, dtype=np.float32)  # (4, h, w)
    if plan.prediction_type == "epsilon":
        x0 = (x - beta**0.5 * out) / alpha**0.5
        eps = out
    else:  # v_prediction, Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = alpha**0.5 * x - beta**0.5 * out
        eps = alpha**0.5 * out + beta**0.5 * x
    clip_range = plan.extra["clip_range"]
    if clip_range is not None:
        x0 = np.clip(x0, -clip_range, clip_range)
    direction = (1 - alpha_prev) ** 0.5 * eps  # "direction pointing to x_t"
    return alpha_prev**0.5 * x0 + direction, None


def add_noise(x0: np.ndarray, noise: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """Clean latents (4, h, w) noised to timestep t_i, sqrt(a) x0 + sqrt(1 - a) noise (the forward
    process q(x_t | x0) of Ho et al. 2020, diffusers' `add_noise`): where an edit starts."""
    alpha = plan.extra["alphas"][i]
    return (alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise).astype(np.float32)


class DDIMSampler:
    """DDIM (Song et al. 2021), eta = 0, as diffusers' DDIMScheduler."""

    name = NAME
    plan = staticmethod(plan)
    scale_model_input = staticmethod(scale_model_input)
    step = staticmethod(step)
    add_noise = staticmethod(add_noise)
