"""LCM: multistep sampling of a latent consistency model.

Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step
Inference", Algorithm 3: at each step the consistency function f(x, t) = c_skip(t) x +
c_out(t) x0(x, t) jumps straight to a clean estimate, which is re-noised to the next timestep
with fresh Gaussian noise (none after the last step). The timesteps are taken evenly, by index,
from the `original_inference_steps`-long distillation schedule, as in diffusers' `LCMScheduler`.
The latents stay on the variance-preserving scale, so `init_noise_sigma` is 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import InvalidRequestError
from engine.samplers.base import SamplerPlan
from engine.schedules import NoiseSchedule, check_steps, readonly

NAME = "lcm"
SIGMA_DATA = 0.5  # Song et al. 2023, "Consistency Models", boundary-condition constant


def plan(schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """Timesteps (N,), their cumulative alphas, and the boundary-condition scalings.

    The distillation schedule is t = k T/original_steps - 1 for k = 1..original_steps; at most
    `original_inference_steps` (50 unless the config says otherwise) steps can be taken.
    `timestep_spacing` and `steps_offset` play no part, and under zero terminal SNR
    alphas_cumprod[T-1] stays exactly 0, as in diffusers.
    """
    original_steps = schedule.original_inference_steps
    check_steps(steps, min(original_steps, schedule.num_train_timesteps), NAME)
    k = schedule.num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # (original_steps,) descending
    picks = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    timesteps = origin[picks]  # (N,) int64
    ac = schedule.alphas_cumprod_f32()  # (T,)
    alpha = ac[timesteps]  # (N,) float32
    if schedule.prediction_type == "epsilon" and alpha[0] == 0.0:
        raise InvalidRequestError(
            f"sampler 'lcm' cannot start at zero SNR (timestep {timesteps[0]}) with an epsilon "
            "model: x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero",
            param="sampler",
        )
    # The last step re-noises to its own timestep, but its noise is never drawn (see step).
    alpha_prev = ac[np.append(timesteps[1:], timesteps[-1])]  # (N,) float32

    scaled_t = timesteps.astype(np.float32) * np.float32(schedule.timestep_scaling)  # (N,)
    c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
    c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
    clip_sample = False if schedule.clip_sample is None else schedule.clip_sample
    return SamplerPlan(
        sampler=NAME,
        prediction_type=schedule.prediction_type,
        timesteps=readonly(timesteps.astype(np.float32)),
        init_noise_sigma=1.0,
        extra={
            "alphas": readonly(alpha),
            "alphas_prev": readonly(alpha_prev),
            "c_skip": readonly(c_skip.astype(np.float32)),
            "c_out": readonly(c_out.astype(np.float32)),
            "clip_range": schedule.clip_sample_range if clip_sample else None,
        },
    )


def scale_model_input(x: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """LCM feeds the VP-scale latents to the UNet unchanged."""
    return x


def step(
    x: np.ndarray,
    model_output: np.ndarray,
    plan: SamplerPlan,
    i: int,
    state: Any,
    rng: np.random.Generator,
) -> tuple[np.ndarray, None]:
    """One consistency step; draws rng.standard_normal(x.shape, float32) once unless i is last.

    After the last step x is the denoised estimate itself, which is also what diffusers' LCM
    pipeline decodes.
    """
    alpha, alpha_prev = plan.extra["alphas"][i], plan.extra["alphas_prev"][i]
    beta, beta_prev = 1 - alpha, 1 - alpha_prev
    x = np.asarray(x, dtype=np.float32)  # (4, h, w)
    out = np.asarray(model_output, dtype=np.float32)  # (4, h, w)
    if plan.prediction_type == "epsilon":
        x0 = (x - np.sqrt(beta) * out) / np.sqrt(alpha)
    else:  # v_prediction
        x0 = np.sqrt(alpha) * x - np.sqrt(beta) * out
    clip_range = plan.extra["clip_range"]
    if clip_range is not None:
        x0 = np.clip(x0, -clip_range, clip_range)
    denoised = plan.extra["c_out"][i] * x0 + plan.extra["c_skip"][i] * x

    if i == plan.num_steps - 1:
        return denoised, None
    noise = rng.standard_normal(x.shape, dtype=np.float32)  # (4, h, w)
    return np.sqrt(alpha_prev) * denoised + np.sqrt(beta_prev) * noise, None


def add_noise(x0: np.ndarray, noise: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """Clean latents (4, h, w) noised to timestep t_i, sqrt(a) x0 + sqrt(1 - a) noise (the forward
    process q(x_t | x0) of Ho et al. 2020, diffusers' `add_noise`): where an edit starts."""
    alpha = plan.extra["alphas"][i]
    return (alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise).astype(np.float32)


class LCMSampler:
    """Latent consistency model multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler."""

    name = NAME
    plan = staticmethod(plan)
    scale_model_input = staticmethod(scale_model_input)
    step = staticmethod(step)
    add_noise = staticmethod(add_noise)
