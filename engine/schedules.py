"""The training noise schedule of a diffusion model, read from its diffusers scheduler config.

A model's `scheduler/config.json` describes the forward process it was trained with: the betas,
how they were rescaled, what the UNet predicts, and how inference timesteps are spaced. Every
sampler builds its per-request plan from one `NoiseSchedule`.

Precision follows diffusers on purpose: diffusers computes betas and `alphas_cumprod` in float32
torch tensors (with a float64 accumulator in `cumprod`), so `NoiseSchedule` reproduces that
float32 arithmetic and stores the results widened to float64. Samplers then match diffusers'
trajectories to ~1e-7 relative, instead of drifting by the float32-vs-float64 difference of the
tables themselves (up to 4e-5 relative near zero SNR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import InvalidRequestError

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers' Euler and DPM-Solver schedulers replace a zero terminal alphas_cumprod by this value
# (the smallest positive float16 subnormal) so the first sigma is finite (4096); DDIM and LCM
# keep the exact zero.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A model's discrete-time forward process q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I).

    Keys the config leaves out are kept as None when diffusers' scheduler classes disagree on
    their default (`timestep_spacing`, `clip_sample`, `set_alpha_to_one`), so each sampler can
    apply the default of the diffusers class it reproduces.
    """

    num_train_timesteps: int
    beta_schedule: str  # "linear" | "scaled_linear" | "squaredcos_cap_v2" | "trained"
    betas: np.ndarray  # (T,) float64, after any zero-SNR rescale
    alphas_cumprod: np.ndarray  # (T,) float64; exactly 0 at t = T-1 under zero terminal SNR
    prediction_type: str  # "epsilon" | "v_prediction"
    timestep_spacing: str | None  # "leading" | "trailing" | "linspace" | None (sampler default)
    steps_offset: int
    rescale_betas_zero_snr: bool
    clip_sample: bool | None
    clip_sample_range: float
    set_alpha_to_one: bool | None
    original_inference_steps: int  # LCM: length of the distillation schedule
    timestep_scaling: float  # LCM: scales t in the consistency boundary condition

    @classmethod
    def from_scheduler_config(cls, cfg: dict[str, Any]) -> NoiseSchedule:
        """Build the schedule from a diffusers scheduler `config.json` dict.

        Any of diffusers' DDIM/PNDM/Euler/DDPM/LCM/DPM-Solver configs works: keys that only
        other schedulers use are ignored. Raises ValueError naming the key that cannot be run.
        """
        if not isinstance(cfg, dict):
            raise ValueError(f"scheduler config must be a JSON object, got {type(cfg).__name__}")

        prediction_type = cfg.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"scheduler config: prediction_type {prediction_type!r} is not supported; Kiln's "
                f"samplers run models that predict one of {list(PREDICTION_TYPES)}"
            )
        num_train_timesteps = cfg.get("num_train_timesteps", 1000)
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(
                f"scheduler config: num_train_timesteps must be an integer >= 2, "
                f"got {num_train_timesteps!r}"
            )
        spacing = cfg.get("timestep_spacing")
        if spacing is not None and spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"scheduler config: timestep_spacing {spacing!r} is not one of "
                f"{list(TIMESTEP_SPACINGS)}"
            )
        if cfg.get("thresholding", False):
            raise ValueError(
                "scheduler config: thresholding=true (Imagen's dynamic thresholding, for "
                "pixel-space models) is not supported; latent diffusion configs set it to false"
            )
        steps_offset = cfg.get("steps_offset", 0)
        if not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(
                "scheduler config: steps_offset must be a non-negative integer, "
                f"got {steps_offset!r}"
            )

        original_inference_steps = cfg.get("original_inference_steps", 50)
        if not isinstance(original_inference_steps, int) or not (
            1 <= original_inference_steps <= num_train_timesteps
        ):
            raise ValueError(
                f"scheduler config: original_inference_steps must be an integer from 1 to "
                f"num_train_timesteps ({num_train_timesteps}), got {original_inference_steps!r}"
            )

        trained_betas = cfg.get("trained_betas")
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(
                    f"scheduler config: trained_betas has shape {betas.shape}, expected "
                    f"({num_train_timesteps},) to match num_train_timesteps"
                )
            beta_schedule = "trained"
        else:
            # Missing beta keys take DDPM's defaults, shared by every scheduler here but LCM's
            # (scaled_linear 0.00085..0.012); real configs always state them.
            beta_schedule = cfg.get("beta_schedule", "linear")
            betas = make_betas(
                beta_schedule,
                float(cfg.get("beta_start", 0.0001)),
                float(cfg.get("beta_end", 0.02)),
                num_train_timesteps,
            )

        rescale = bool(cfg.get("rescale_betas_zero_snr", False))
        if rescale:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod32(np.float32(1.0) - betas)

        return cls(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            betas=readonly(betas.astype(np.float64)),
            alphas_cumprod=readonly(alphas_cumprod.astype(np.float64)),
            prediction_type=prediction_type,
            timestep_spacing=spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale,
            clip_sample=cfg.get("clip_sample"),
            clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
            set_alpha_to_one=cfg.get("set_alpha_to_one"),
            original_inference_steps=original_inference_steps,
            timestep_scaling=float(cfg.get("timestep_scaling", 10.0)),
        )

    def alphas_cumprod_f32(self) -> np.ndarray:
        """(T,) float32: `alphas_cumprod` as diffusers holds it, for float32 step arithmetic."""
        return self.alphas_cumprod.astype(np.float32)

    def train_sigmas(self) -> np.ndarray:
        """(T,) float32 sigma_t = sqrt((1 - a_t) / a_t) at every training timestep.

        This is the variance-exploding view of the schedule (Karras et al. 2022, "Elucidating the
        Design Space of Diffusion-Based Generative Models", x_VE = x_VP / sqrt(a_t)).

        Under zero terminal SNR the last a_t becomes 2**-24 first, as in diffusers' Euler and
        DPM-Solver schedulers, so sigma_max is 4096 rather than infinite.
        """
        ac = self.alphas_cumprod_f32()
        if self.rescale_betas_zero_snr:
            ac[-1] = ZERO_SNR_ALPHA_CUMPROD
        return np.sqrt((np.float32(1.0) - ac) / ac)


def make_betas(schedule: str, beta_start: float, beta_end: float, n: int) -> np.ndarray:
    """(n,) float32 betas for diffusers' named beta schedules.

    "scaled_linear" is linear in sqrt(beta) (Rombach et al. 2022, latent diffusion);
    "squaredcos_cap_v2" is the cosine schedule of Nichol & Dhariwal 2021, eq. 17, with betas
    capped at 0.999.
    """
    if schedule == "linear":
        return np.linspace(beta_start, beta_end, n).astype(np.float32)
    if schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32) ** 2
    if schedule == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=np.float32,
        )
    raise ValueError(
        f"scheduler config: beta_schedule {schedule!r} is not one of {list(BETA_SCHEDULES)} "
        "(or give trained_betas)"
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """(T,) float32 betas rescaled so the last timestep has zero SNR.

    Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1:
    shift sqrt(alphas_cumprod) so its last value is 0, scale it so its first value is unchanged,
    and convert back to betas.
    """
    sqrt_ac = np.sqrt(_cumprod32(np.float32(1.0) - betas))
    first, last = sqrt_ac[0], sqrt_ac[-1]
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
    return np.float32(1.0) - alphas


def spaced_timesteps(
    num_train_timesteps: int, steps: int, spacing: str, steps_offset: int, *, round_linspace: bool
) -> np.ndarray:
    """(steps,) float64 descending inference timesteps for one of Lin et al. 2023's spacings.

    "linspace", "leading" and "trailing" are Table 2 of Lin et al. 2023; only "leading" adds
    `steps_offset`. Euler keeps linspace's fractional timesteps, DDIM rounds them
    (`round_linspace`). Trailing is computed as round(T - k T/N) - 1 for k < N, which equals
    diffusers' `np.arange(T, 0, -T/N)` except that for some N (61, 103, ...) that arange yields
    an extra timestep -1; we take exactly N.
    """
    t_max = num_train_timesteps
    if spacing == "linspace":
        ts = np.linspace(0, t_max - 1, steps)
        ts = ts.round() if round_linspace else ts.astype(np.float32).astype(np.float64)
        return ts[::-1].copy()
    if spacing == "leading":
        step_ratio = t_max // steps
        return (np.arange(steps) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        step_ratio = t_max / steps
        return np.round(t_max + np.arange(steps) * -step_ratio) - 1.0
    raise ValueError(f"timestep_spacing {spacing!r} is not one of {list(TIMESTEP_SPACINGS)}")


def check_steps(steps: int, limit: int, sampler: str) -> None:
    """Raise InvalidRequestError(param="steps") unless 1 <= steps <= limit."""
    is_int = isinstance(steps, (int, np.integer)) and not isinstance(steps, bool)
    if not is_int or not 1 <= steps <= limit:
        raise InvalidRequestError(
            f"steps must be an integer from 1 to {limit} for sampler {sampler!r}, got {steps!r}",
            param="steps",
        )


def _cumprod32(alphas: np.ndarray) -> np.ndarray:
    # torch's CPU cumprod of float32 accumulates in float64 and rounds each partial product once.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def readonly(a: np.ndarray) -> np.ndarray:
    """`a`, marked read-only: schedules and plans are shared by every sample that uses them."""
    a.setflags(write=False)
    return a
