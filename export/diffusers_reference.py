"""The diffusers PyTorch pipeline that each Kiln sampler is checked and timed against."""

from __future__ import annotations

# Kiln sampler name -> (diffusers scheduler class, extra config).
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "lcm": ("LCMScheduler", {}),
}


def reference_pipeline(checkpoint: str, sampler: str):
    """diffusers' pipeline for `checkpoint` with the scheduler equivalent to Kiln's `sampler`."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(checkpoint))
    cls_name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
