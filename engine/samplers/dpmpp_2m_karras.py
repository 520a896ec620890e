"""DPM-Solver++(2M) on Karras sigmas: the second-order multistep data-prediction solver.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Algorithm 2 (multistep, midpoint form), over the sigma schedule of Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5 with rho = 7.
Matches diffusers' `DPMSolverMultistepScheduler(use_karras_sigmas=True,
algorithm_type="dpmsolver++", solver_order=2)` with its defaults (solver_type "midpoint",
lower_order_final, final_sigmas_type "zero"): the first and the last step are first order.

The latents stay on the variance-preserving scale x = alpha_t x0 + sigma_t eps, so
`init_noise_sigma` is 1. The carried state is the previous step's x0 estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.samplers.base import SamplerPlan
from engine.schedules import NoiseSchedule, check_steps, readonly

NAME = "dpmpp_2m_karras"
RHO = 7.0


def karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """(n,) float64 sigmas evenly spaced in sigma^(1/rho) from sigma_max down to sigma_min."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / RHO)
    max_inv_rho = sigma_max ** (1 / RHO)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** RHO


def sigma_to_t(sigmas: np.ndarray, log_train_sigmas: np.ndarray) -> np.ndarray:
    """(n,) float64 fractional timesteps: sigmas located on the training schedule by log-linear
    interpolation (diffusers' `_sigma_to_t`); log_train_sigmas is (T,) float32, ascending."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))  # (n,)
    dists = log_sigma[None, :] - log_train_sigmas[:, None]  # (T, n)
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_train_sigmas.shape[0] - 2)
    high = low + 1
    w = (log_train_sigmas[low] - log_sigma) / (log_train_sigmas[low] - log_train_sigmas[high])
    w = np.clip(w, 0, 1)
    return (1 - w) * low + w * high


def plan(schedule: NoiseSchedule, steps: int) -> SamplerPlan:
    """Karras sigmas (N+1,) ending at 0, and the rounded timesteps (N,) the UNet sees.

    sigma_min and sigma_max are the training schedule's extremes (4096 under zero terminal
    SNR); `timestep_spacing` and `steps_offset` play no part.
    """
    check_steps(steps, schedule.num_train_timesteps, NAME)
    train_sigmas = schedule.train_sigmas()  # (T,) float32, ascending in t
    sigmas = karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), steps)  # (N,)
    timesteps = sigma_to_t(sigmas, np.log(train_sigmas))
    if schedule.beta_schedule != "squaredcos_cap_v2":  # diffusers keeps cosine timesteps fractional
        timesteps = timesteps.round()
    return SamplerPlan(
        sampler=NAME,
        prediction_type=schedule.prediction_type,
        timesteps=readonly(timesteps.astype(np.int64).astype(np.float32)),
        init_noise_sigma=1.0,
        extra={"sigmas": readonly(np.append(sigmas, 0.0).astype(np.float32))},  # (N+1,)
    )


def scale_model_input(x: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """DPM-Solver feeds the VP-scale latents to the UNet unchanged."""
    return x


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    # VE sigma -> VP (alpha_t, sigma_t): alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t.
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(alpha_t: np.float32, sigma_t: np.float32) -> np.float32:
    # Half log-SNR, lambda = log(alpha_t / sigma_t), the solver's time variable.
    return np.log(alpha_t) - np.log(sigma_t)


def step(
    x: np.ndarray,
    model_output: np.ndarray,
    plan: SamplerPlan,
    i: int,
    state: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One DPM-Solver++ step from sigma_i to sigma_{i+1}; draws no noise.

    state: the previous step's x0 estimate (4, h, w) float32, None at i == 0; returns this
    step's x0 as the new state. With h = lambda_{i+1} - lambda_i and r = h_{i-1} / h:
        first order:  x' = (s'/s) x - alpha' (e^-h - 1) D0                  (= DDIM)
        second order: x' = (s'/s) x - alpha' (e^-h - 1) (D0 + (D0 - D_prev) / (2 r))
    """
    sigmas = plan.extra["sigmas"]
    x = np.asarray(x, dtype=np.float32)  # (4, h, w)
    out = np.asarray(model_output, dtype=np.float32)  # (4, h, w)

    alpha_s, sigma_s = _alpha_sigma(sigmas[i])
    if plan.prediction_type == "epsilon":
        x0 = (x - sigma_s * out) / alpha_s
    else:  # v_prediction: x0 = alpha_t x - sigma_t v
        x0 = alpha_s * x - sigma_s * out

    if i == plan.num_steps - 1:
        # Final sigma 0: lambda = inf, exp(-h) = 0, and the update reduces exactly to x0.
        return x0, x0

    alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1])
    lambda_s, lambda_t = _lambda(alpha_s, sigma_s), _lambda(alpha_t, sigma_t)
    h = lambda_t - lambda_s
    if state is None:  # first step: no history, first order
        return (sigma_t / sigma_s) * x - (alpha_t * (np.exp(-h) - 1.0)) * x0, x0

    alpha_p, sigma_p = _alpha_sigma(sigmas[i - 1])
    r0 = (lambda_s - _lambda(alpha_p, sigma_p)) / h
    d0, d1 = x0, (1.0 / r0) * (x0 - state)
    x_next = (
        (sigma_t / sigma_s) * x
        - (alpha_t * (np.exp(-h) - 1.0)) * d0
        - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
    )
    return x_next, x0


def add_noise(x0: np.ndarray, noise: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
    """Clean latents (4, h, w) noised to sigma_i on the VP scale, alpha_t x0 + sigma_t noise
    (diffusers' `add_noise`): where an edit starts."""
    alpha_t, sigma_t = _alpha_sigma(plan.extra["sigmas"][i])
    return (alpha_t * x0 + sigma_t * noise).astype(np.float32)


class DPMPP2MKarrasSampler:
    """DPM-Solver++(2M) with Karras sigmas (Lu et al. 2022; Karras et al. 2022)."""

    name = NAME
    plan = staticmethod(plan)
    scale_model_input = staticmethod(scale_model_input)
    step = staticmethod(step)
    add_noise = staticmethod(add_noise)
