"""Classifier-free guidance for one sample, with optional guidance rescale.

Ho & Salimans 2022, "Classifier-Free Diffusion Guidance": out = uncond + w (cond - uncond).
Guidance rescale is Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
Flawed", section 3.4: scale the guided output back to the standard deviation of the conditional
one, then blend by `guidance_rescale` to keep some of the guided contrast. Both match diffusers'
StableDiffusionPipeline and its `rescale_noise_cfg` (which applies rescale only when guidance
is on).
"""

from __future__ import annotations

import numpy as np

from engine.errors import InvalidRequestError


def apply_guidance(
    uncond: np.ndarray, cond: np.ndarray, guidance_scale: float, guidance_rescale: float = 0.0
) -> np.ndarray:
    """Guided UNet output for one sample; uncond, cond and the result are (4, h, w) float32.

    guidance_scale <= 1 means no guidance: `cond` is returned as is (uncond is not needed and
    may be None). guidance_rescale in [0, 1]; 0 is plain CFG.
    """
    if guidance_scale <= 1:
        return cond
    if not 0.0 <= guidance_rescale <= 1.0:
        raise InvalidRequestError(
            f"guidance_rescale must be from 0 to 1, got {guidance_rescale}", param="guidance_rescale"
        )
    guided = uncond + guidance_scale * (cond - uncond)  # (4, h, w)
    if guidance_rescale > 0.0:
        # Per-sample standard deviations with Bessel's correction, as torch.std computes them.
        std_cond = cond.std(ddof=1, dtype=np.float64)
        std_guided = guided.std(ddof=1, dtype=np.float64)
        rescaled = guided * np.float32(std_cond / std_guided)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided.astype(np.float32, copy=False)
