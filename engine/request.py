"""The one request type of Kiln, and the one place it is validated.

An `ImageRequest` is what the front end builds from an HTTP request, what crosses the gRPC wire
(engine/worker/wire.py derives its inputs from these fields), and what the pipeline runs: a
generation of `n` images, or an edit of an input image when `image` is given (img2img, or
inpainting with `mask`). Fields left None take the model's defaults, filled by the worker
(`Pipeline.resolve`).

`ModelLimits` is what a worker says it accepts for one model (its ModelMetadata); the front end
caps it with its own configuration and validates with the same `validate_request`, so a front end
never accepts a request its workers would refuse.

Edits (documented in the README): with `strength` s in (0, 1] and `steps` N, as diffusers'
img2img and inpainting pipelines do, init = min(int(N * s), N) steps are run, starting at the
sampler's step N - init. So `steps` counts the steps of the whole schedule, not the steps run.
"""

from __future__ import annotations

import math
from typing import Annotated

import msgspec

from engine.errors import InvalidRequestError, UnknownLoraError, UnknownSamplerError
from engine.lora.prompt_tags import take_lora_tags
from engine.shapes import size_problem

MAX_STEPS = 150  # a request over this is refused; the worker may configure a lower cap
MAX_GUIDANCE = 50.0
MAX_N = 10  # images per request on the wire; a worker with a smaller queue says less
MAX_PROMPT_CHARS = 4000
SEED_LIMIT = 2**63
SEED_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792")  # the contract's sizes
MAX_LORAS = 8  # LoRAs one request may combine (each is a set of weights the worker adds up)
# LoRA scales a request may ask for. Past them a LoRA overwhelms the base model (A1111 users
# rarely go beyond 1.5); negative scales subtract a style, which some LoRAs are trained for.
MIN_LORA_SCALE, MAX_LORA_SCALE = -2.0, 2.0


class LoraChoice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One LoRA stored with the model (`kiln lora add`), at `scale`: W' = W + scale * delta."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, description="A LoRA the model lists (GET /v1/models).")]
    scale: Annotated[
        float,
        msgspec.Meta(ge=-2.0, le=2.0, description="How strongly it applies: 0 is the base model, 1 the LoRA as trained."),
    ] = 1.0


class ImageRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A generation (or edit) of n images; image k uses seed + k."""

    prompt: str
    model: str = ""  # the worker-side model (package) name
    width: int | None = None  # None: the input image's size for edits, else the model's default
    height: int | None = None
    seed: int | None = None  # None: a random one (returned with the images)
    n: int = 1
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's default; for edits, the whole schedule's length
    guidance_scale: float | None = None
    guidance_rescale: float | None = None
    sampler: str | None = None
    preview_every: int = 0  # streaming: a small JPEG preview every k steps (0: none)
    image: bytes | None = None  # an encoded PNG, JPEG or WebP to edit (engine/image_input.py)
    mask: bytes | None = None  # with image: what to repaint (OpenAI's alpha rule, or white = repaint)
    strength: float | None = None  # edits: share of the schedule re-run, (0, 1]; None: the default
    # LoRAs to apply, besides the prompt's <lora:NAME:SCALE> tags (`with_prompt_loras` moves
    # those here). Scale 0 is the base model exactly.
    loras: tuple[LoraChoice, ...] = ()

    @property
    def is_edit(self) -> bool:
        return self.image is not None


class ModelLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker accepts for one model: the single source of the limits a client sees."""

    name: str
    family: str = ""
    default_size: str = "512x512"
    min_side: int = 64
    max_side: int = 2048
    multiple_of: int = 8
    default_steps: int = 30
    default_sampler: str = "euler"
    default_guidance_scale: float = 7.5
    default_strength: float = 0.5  # img2img (a follow-up turn): keeps the layout, follows the prompt
    default_inpaint_strength: float = 1.0  # with a mask: the masked region redrawn from noise, as diffusers
    samplers: tuple[str, ...] = ()
    max_steps: int = MAX_STEPS
    max_n: int = MAX_N
    max_batch: int = 1
    max_prompt_chars: int = MAX_PROMPT_CHARS
    edits: bool = False  # the package has a VAE encoder: img2img and inpainting work
    inpainting_unet: bool = False  # a 9-channel inpainting UNet: edits need a mask
    loras: tuple[str, ...] = ()  # names of the LoRAs a request may choose (stored with the package)

    def capped(self, *, max_n: int, max_steps: int, max_prompt_chars: int, max_side: int | None) -> ModelLimits:
        """These limits lowered by a front end's own configuration (never raised)."""
        return msgspec.structs.replace(
            self,
            max_n=min(self.max_n, max_n),
            max_steps=min(self.max_steps, max_steps),
            max_prompt_chars=min(self.max_prompt_chars, max_prompt_chars),
            max_side=min(self.max_side, max_side) if max_side else self.max_side,
        )


def with_prompt_loras(req: ImageRequest) -> ImageRequest:
    """The request with its prompt's <lora:NAME:SCALE> tags moved into `loras` (after the field's
    own), so the text encoder never sees them; the same request back when the prompt has none."""
    if not isinstance(req.prompt, str):
        return req
    prompt, tags = take_lora_tags(req.prompt)
    if not tags:
        return req
    loras = req.loras + tuple(LoraChoice(name=name, scale=scale) for name, scale in tags)
    return msgspec.structs.replace(req, prompt=prompt, loras=loras)


def default_strength(req: ImageRequest, limits: ModelLimits) -> float | None:
    """An edit's strength when the request names none (None for text-to-image)."""
    if not req.is_edit:
        return None
    if req.strength is not None:
        return req.strength
    return limits.default_inpaint_strength if req.mask is not None else limits.default_strength


def edit_steps(steps: int, strength: float) -> tuple[int, int]:
    """(first step index, steps run) of an edit, diffusers' rule: init = min(int(N*s), N)."""
    init = min(int(steps * strength), steps)
    return steps - init, init


def steps_run(req: ImageRequest) -> int:
    """Denoising steps one image of a resolved request takes."""
    steps = req.steps or 0
    if req.is_edit and req.strength is not None:
        return edit_steps(steps, req.strength)[1]
    return steps


def allowed_sizes_text(limits: ModelLimits) -> str:
    lo, hi, k = limits.min_side, limits.max_side, limits.multiple_of
    fixed = [s for s in SEED_SIZES if all(lo <= int(v) <= hi and int(v) % k == 0 for v in s.split("x"))]
    any_size = f"any WIDTHxHEIGHT with both sides multiples of {k} between {lo} and {hi}"
    return (", ".join(fixed) + ", or " + any_size) if fixed else any_size


def size_fits(width: int, height: int, limits: ModelLimits) -> bool:
    return size_problem(width, height, limits) is None


def validate_request(req: ImageRequest, limits: ModelLimits, *, size_param: str = "size") -> None:
    """Raise InvalidRequestError naming the first bad field. Fields still None are not checked
    (the worker fills them from the model's defaults, which are valid by construction)."""
    if not isinstance(req.prompt, str):
        raise InvalidRequestError("prompt must be a string", param="prompt")
    if not req.prompt.strip() and not req.is_edit:
        raise InvalidRequestError("the prompt is empty: describe the image to generate", param="prompt")
    for name, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
        if len(text) > limits.max_prompt_chars:
            raise InvalidRequestError(
                f"{name} has {len(text)} characters; this server accepts at most {limits.max_prompt_chars}", param=name
            )
    if not (1 <= req.n <= limits.max_n):
        raise InvalidRequestError(f"n must be between 1 and {limits.max_n}, got {req.n}", param="n")
    if req.steps is not None and not (1 <= req.steps <= limits.max_steps):
        raise InvalidRequestError(f"steps must be between 1 and {limits.max_steps}, got {req.steps}", param="steps")
    if req.guidance_scale is not None and not (0.0 <= req.guidance_scale <= MAX_GUIDANCE):
        raise InvalidRequestError(
            f"guidance_scale must be between 0 and {MAX_GUIDANCE:g}, got {req.guidance_scale}", param="guidance_scale"
        )
    if req.guidance_rescale is not None and not (0.0 <= req.guidance_rescale <= 1.0):
        raise InvalidRequestError(
            f"guidance_rescale must be between 0 and 1, got {req.guidance_rescale}", param="guidance_rescale"
        )
    if req.sampler is not None and limits.samplers and req.sampler not in limits.samplers:
        raise UnknownSamplerError(
            f"unknown sampler {req.sampler!r}; valid samplers are {', '.join(sorted(limits.samplers))}", param="sampler"
        )
    if req.seed is not None and not (0 <= req.seed and req.seed + req.n - 1 < SEED_LIMIT):
        raise InvalidRequestError(f"seed + n - 1 must be between 0 and 2**63-1, got seed {req.seed} with n {req.n}", param="seed")
    if req.preview_every < 0:
        raise InvalidRequestError(f"preview_every must be 0 (none) or a number of steps, got {req.preview_every}", param="preview_every")
    if (req.width is None) != (req.height is None):
        raise InvalidRequestError("give both width and height, or neither", param=size_param)
    if req.width is not None and not size_fits(req.width, req.height, limits):
        raise InvalidRequestError(
            f"{size_problem(req.width, req.height, limits)}: model '{limits.name}' takes {allowed_sizes_text(limits)}",
            param=size_param,
        )
    _validate_edit(req, limits)
    _validate_loras(req, limits)


def _validate_loras(req: ImageRequest, limits: ModelLimits) -> None:
    if len(req.loras) > MAX_LORAS:
        raise InvalidRequestError(f"{len(req.loras)} LoRAs asked for; a request may combine at most {MAX_LORAS}", param="loras")
    seen = set()
    for choice in req.loras:
        scale = choice.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InvalidRequestError(f"LoRA {choice.name!r}: the scale must be a number, got {scale!r}", param="loras")
        if not MIN_LORA_SCALE <= scale <= MAX_LORA_SCALE:
            raise InvalidRequestError(
                f"LoRA {choice.name!r}: the scale must be between {MIN_LORA_SCALE:g} and {MAX_LORA_SCALE:g}, got {scale:g}",
                param="loras",
            )
        if choice.name in seen:
            raise InvalidRequestError(
                f"LoRA {choice.name!r} is asked for twice (in `loras` or as <lora:{choice.name}:...> in the prompt): "
                f"give it once, with the scale you want",
                param="loras",
            )
        seen.add(choice.name)
        if choice.name not in limits.loras:
            have = ", ".join(limits.loras) if limits.loras else "none"
            raise UnknownLoraError(
                f"model '{limits.name}' has no LoRA named {choice.name!r} (its LoRAs: {have}); "
                f"store one with `kiln lora add PACKAGE FILE --name {choice.name}`",
                param="loras",
            )


def _validate_edit(req: ImageRequest, limits: ModelLimits) -> None:
    if not req.is_edit:
        if req.mask is not None:
            raise InvalidRequestError("a mask was sent without an image to edit: send the image too", param="mask")
        if req.strength is not None:
            raise InvalidRequestError("strength applies to edits only: send an image to edit, or leave it out", param="strength")
        return
    if not limits.edits:
        raise InvalidRequestError(
            f"model '{limits.name}' cannot edit images: its package has no VAE encoder (re-export it with this Kiln)",
            param="image",
        )
    if limits.inpainting_unet and req.mask is None:
        raise InvalidRequestError(
            f"model '{limits.name}' is an inpainting model: send a mask saying what to repaint", param="mask"
        )
    if req.strength is not None:
        if not (0.0 < req.strength <= 1.0):
            raise InvalidRequestError(f"strength must be in (0, 1], got {req.strength}", param="strength")
        if req.steps is not None and edit_steps(req.steps, req.strength)[1] < 1:
            raise InvalidRequestError(
                f"strength {req.strength} of {req.steps} steps runs no step (int(steps * strength) = 0): "
                f"raise strength or steps",
                param="strength",
            )
