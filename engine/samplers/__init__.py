"""Kiln's samplers by request name; each is stateless (see `engine.samplers.base`)."""

from __future__ import annotations

from engine.errors import UnknownSamplerError
from engine.samplers.base import Sampler, SamplerPlan
from engine.samplers.ddim import DDIMSampler
from engine.samplers.dpmpp_2m_karras import DPMPP2MKarrasSampler
from engine.samplers.euler import EulerSampler
from engine.samplers.euler_ancestral import EulerAncestralSampler
from engine.samplers.lcm import LCMSampler

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        EulerSampler(),
        EulerAncestralSampler(),
        DDIMSampler(),
        DPMPP2MKarrasSampler(),
        LCMSampler(),
    )
}


def get_sampler(name: str) -> Sampler:
    """The sampler called `name`.

    Raises UnknownSamplerError (param "sampler") whose message lists the valid names.
    """
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UnknownSamplerError(
            f"unknown sampler {name!r}; valid samplers are {', '.join(sorted(SAMPLERS))}",
            param="sampler",
        ) from None


__all__ = ["SAMPLERS", "Sampler", "SamplerPlan", "get_sampler"]
