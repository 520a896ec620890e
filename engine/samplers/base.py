"""The contract every sampler meets: stateless functions over one sample's arrays.

A running batch may hold samples at different steps, with different step counts, samplers and
guidance, so nothing here keeps hidden state: each call gets the sample's own plan, step index,
carried state and random generator, and returns the new latents and state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class SamplerPlan:
    """What a sampler precomputes for one (noise schedule, step count).

    `timesteps` are what the UNet sees at each step; `init_noise_sigma` scales the unit-normal
    starting noise, exactly as diffusers' `scheduler.init_noise_sigma` does. `extra` holds the
    sampler's own arrays (sigmas, alphas, ...).
    """

    sampler: str
    prediction_type: str  # "epsilon" | "v_prediction"
    timesteps: np.ndarray  # (N,) float32
    init_noise_sigma: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


class Sampler(Protocol):
    name: str

    def plan(self, schedule: "NoiseSchedule", steps: int) -> SamplerPlan: ...  # noqa: F821

    def scale_model_input(self, x: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
        """x: (4, h, w) float32 latents -> the UNet's input at step i, same shape."""
        ...

    def step(
        self,
        x: np.ndarray,
        model_output: np.ndarray,
        plan: SamplerPlan,
        i: int,
        state: Any,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, Any]:
        """Advance one sample from step i to i+1.

        x, model_output: (4, h, w) float32; model_output is the guided UNet output (epsilon or
        v, per plan.prediction_type). state is None at the first step run (i == 0, or an edit's
        first step). Random draws use `rng` only.
        """
        ...

    def add_noise(self, x0: np.ndarray, noise: np.ndarray, plan: SamplerPlan, i: int) -> np.ndarray:
        """Clean latents x0 (4, h, w) noised to step i's noise level with `noise` (4, h, w), on
        this sampler's latent scale: an edit starts from add_noise(image latents, noise, first)."""
        ...
