"""The diffusers PyTorch pipelines that each Kiln sampler and editing mode is checked and timed against."""

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
# Editing mode -> the diffusers auto-pipeline that picks the family's class: StableDiffusion
# [XL]Img2ImgPipeline or StableDiffusion[XL]InpaintPipeline.
EDIT_PIPELINES = {"img2img": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"}


def _with_sampler(pipe, sampler: str):
    import diffusers

    cls_name, extra = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_pipeline(checkpoint: str, sampler: str):
    """diffusers' pipeline for `checkpoint` with the scheduler equivalent to Kiln's `sampler`."""
    import diffusers

    return _with_sampler(diffusers.DiffusionPipeline.from_pretrained(str(checkpoint)), sampler)


def reference_edit_pipeline(checkpoint: str, sampler: str, kind: str):
    """diffusers' img2img or inpainting pipeline for `checkpoint`, with `sampler`'s scheduler.

    kind "img2img": StableDiffusionImg2ImgPipeline (SD 1.x/2.x) or StableDiffusionXLImg2ImgPipeline;
    kind "inpaint": StableDiffusionInpaintPipeline or StableDiffusionXLInpaintPipeline, which run a
    9-channel inpainting UNet with the mask and masked image as inputs, and a 4-channel one by
    blending the known region's noised latents back in after each step.
    """
    if kind not in EDIT_PIPELINES:
        raise ValueError(f"kind must be one of {', '.join(EDIT_PIPELINES)}, not {kind!r}")
    import diffusers

    pipe = getattr(diffusers, EDIT_PIPELINES[kind]).from_pretrained(str(checkpoint))
    return _with_sampler(pipe, sampler)
