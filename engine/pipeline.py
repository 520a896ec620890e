"""Text-to-image and edits with a model package: tokenize -> text encoder -> [VAE encode the input
image] -> denoise -> VAE decode -> RGB [-> paste the kept region back].

Built for step-level batching: `prepare` turns requests into independent `Sample`s (n per
request; edits start at a later step and may carry a mask, see engine/edits.py), `denoise_step`
advances any set of samples of one latent shape by one step each with a single UNet call (every
sample at its own step, with its own sampler, guidance and generator), `decode` turns finished
samples into images. `generate` chains them for callers that want a plain function.

Seed -> latents rule (documented in the README; torch is not needed to reproduce it):
    rng = numpy.random.Generator(numpy.random.PCG64(seed))
    noise = rng.standard_normal((4, H/8, W/8), dtype=numpy.float32)
    latents = noise * plan.init_noise_sigma        # exactly diffusers' handling of given latents
and every later random draw of that image (ancestral samplers) comes from the same `rng`, where
image k of a request uses seed + k. Edits draw in the order engine/edits.py documents.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
from PIL import Image

from engine.edits import EditInput, EditState, latent_mask, latent_sample, read_edit_input
from engine.errors import InvalidRequestError, KilnError, NonFiniteOutputError, PackageError
from engine.guidance import apply_guidance
from engine.image_input import feathered_paste, image_size
from engine.manifest import Manifest, read_manifest
from engine.lora.variants import LoraLibrary, Variant
from engine.request import (
    MAX_N,
    MAX_STEPS,
    ImageRequest,
    ModelLimits,
    default_strength,
    edit_steps,
    validate_request,
    with_prompt_loras,
)
from engine.samplers import SAMPLERS, get_sampler
from engine.samplers.base import Sampler, SamplerPlan
from engine.schedules import NoiseSchedule
from engine.session_cache import CacheStats, Key, SessionCache
from engine.sessions import ComponentSessions, RuntimeOptions, check_provider
from engine.shapes import fit_size, latent_shape, parse_size, render_size
from engine.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


# Edits without a strength (README "Editing"). Measured on the bundled model (12 seeds): at 0.5 a
# follow-up turn recolours as asked and keeps an off-centre subject in place (IoU 0.57-0.77 with
# the input's; 0.48-0.74 at 0.6, none at 1.0); 0.4 misses some recolours. With a mask, 1.0 (as
# diffusers): at 0.6 a masked red circle asked to turn white stayed blue-ish on 8 of 8 seeds.
DEFAULT_STRENGTH = 0.5
DEFAULT_INPAINT_STRENGTH = 1.0


@dataclass
class Sample:
    """One image in flight. Everything a denoising step needs, and nothing shared."""

    request: ImageRequest  # resolved: every default filled
    index: int  # image k of its request, drawn with seed + k
    sampler: Sampler
    plan: SamplerPlan
    guidance_scale: float
    guidance_rescale: float
    embeddings: dict[str, np.ndarray]  # UNet conditioning inputs, row 0 = negative, row 1 = prompt
    x: np.ndarray  # (C, h, w) float32 latents
    rng: np.random.Generator
    step: int = 0
    start: int = 0  # the first step: 0, or later for an edit
    edit: EditState | None = None
    state: Any = None
    tag: Any = None  # the caller's handle (the worker keeps (job, image index) here)
    unet_variant: Variant = ()  # the request's LoRAs that change the UNet (engine/lora/variants.py)
    started: float = field(default_factory=time.perf_counter)

    @property
    def seed(self) -> int:
        return self.request.seed + self.index

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

    @property
    def steps_done(self) -> int:
        return self.step - self.start

    @property
    def total_steps(self) -> int:
        return self.plan.num_steps - self.start

    @property
    def done(self) -> bool:
        return self.step >= self.plan.num_steps

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


def initial_noise(seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.random.Generator]:
    """The documented seed -> noise rule; returns the noise and the generator to keep drawing from."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.standard_normal(shape, dtype=np.float32), rng


def runtime_class(target: str) -> type["Pipeline"]:
    """The Pipeline class that runs packages of `target`: onnxruntime CPU sessions, OpenVINO's
    CPU plugin (engine/openvino/), the CUDA execution provider with IOBinding (engine/cuda/), or
    TensorRT engines (engine/tensorrt/)."""
    if target == "openvino":
        from engine.openvino.pipeline import OpenVINOPipeline

        return OpenVINOPipeline
    if target == "cuda":
        from engine.cuda.pipeline import CudaPipeline

        return CudaPipeline
    if target == "tensorrt":
        from engine.tensorrt.pipeline import TensorRTPipeline

        return TensorRTPipeline
    return Pipeline  # cpu; anything else is refused by check_provider with the reason


class Pipeline:
    """`Pipeline(package)` returns the runtime its manifest's target needs (see `runtime_class`),
    so the worker, the CLI and the benchmarks run every target through one constructor."""

    # Whether this runtime applies the package's LoRAs (engine/lora/): onnxruntime's CPU sessions
    # do, through `add_initializer` (engine/sessions.py). A runtime that does not serves none, so
    # a request naming one is refused (its ModelLimits list no LoRA).
    serves_loras = True
    # Whether running another LoRA variant than the last call's costs work of its own (TensorRT:
    # a refit of the engine). The scheduler then keeps one variant's turn a few calls longer.
    variant_switch_cost = False

    def __new__(cls, package: Path | str, *args, **kwargs):
        if cls is Pipeline:
            cls = runtime_class(read_manifest(Path(package)).target)
        return super().__new__(cls)

    def __init__(self, package: Path | str, options: RuntimeOptions | None = None, max_steps: int = MAX_STEPS):
        self.package = Path(package)
        self.manifest: Manifest = read_manifest(self.package)
        self.options = options or RuntimeOptions()
        # Builds the sessions of new sizes off the scheduler thread (`session_keys`). One thread:
        # a build is mostly single-threaded graph work, and more would take cores from the steps.
        self.builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-session-build")
        self.providers = self._providers()
        self.max_steps = max_steps
        self.loras = self._loras()
        m = self.manifest
        self.schedule = NoiseSchedule.from_scheduler_config(m.scheduler_config)
        self.tokenizers = [PromptTokenizer(self.package, spec) for spec in m.tokenizers]
        self.text_encoders = [self._component(name) for name in ("text_encoder", "text_encoder_2") if name in m.components]
        if len(self.text_encoders) != len(self.tokenizers):
            raise PackageError(f"{self.package}: {len(self.tokenizers)} tokenizers for {len(self.text_encoders)} text encoders")
        self.unet = self._component("unet")
        self.vae = self._component("vae_decoder")
        self.vae_encoder = self._component("vae_encoder") if "vae_encoder" in m.components else None
        self.is_xl = m.family == "sdxl"
        self.unet_in_channels = int(getattr(m, "unet_in_channels", m.latent_channels))
        self.inpainting_unet = self.unet_in_channels > m.latent_channels
        self._plans: dict[tuple[str, int], SamplerPlan] = {}
        self._blank_context: dict[tuple[int, ...], np.ndarray] = {}  # 9-channel UNets' text-to-image context

    # ---- what other runtimes replace (engine/openvino/, engine/cuda/, engine/tensorrt/) -----

    def _providers(self) -> list[str]:
        """The onnxruntime providers for this package; refuses one this machine cannot run."""
        return check_provider(self.manifest.target)

    def _loras(self) -> LoraLibrary | None:
        """The package's stored LoRAs, if this runtime serves them."""
        library = LoraLibrary(self.package)
        if library.names and not self.serves_loras:
            log.warning(
                "%s: its %d LoRAs (%s) are not served: the %s runtime does not apply LoRAs yet (serve a cpu package)",
                self.package, len(library.names), ", ".join(library.names), self.manifest.target,
            )
        return library if self.serves_loras else None

    def _component(self, name: str) -> ComponentSessions:
        """What runs one component: anything with `run(feeds, fixed_dims[, variant]) -> outputs`
        and `output_names` (a variant is passed only by runtimes that serve LoRAs)."""
        return ComponentSessions(
            self.package, name, self.manifest.components[name], self.providers, self.options, builder=self.builder,
            loras=self.loras,
        )

    def _conditioning(self, samples: list[Sample], picks: list[list[int]]) -> dict[str, np.ndarray]:
        """The UNet's conditioning rows for one step: each sample's embeddings at its picks, stacked."""
        rows: dict[str, list[np.ndarray]] = {k: [] for k in samples[0].embeddings}
        for s, p in zip(samples, picks):
            for k in rows:
                rows[k].extend(s.embeddings[k][i] for i in p)
        return {k: np.stack(v) for k, v in rows.items()}  # (R, ...) each

    # ---- requests -> samples -------------------------------------------------------------

    def limits(self, max_n: int = MAX_N, max_batch: int = 1) -> ModelLimits:
        """What this model accepts (a worker adds its own max_n and max_batch)."""
        m = self.manifest
        return ModelLimits(
            name=m.name,
            family=m.family,
            default_size=m.sizes.default,
            min_side=m.sizes.min_side,
            max_side=m.sizes.max_side,
            multiple_of=m.sizes.multiple_of,
            default_steps=m.defaults.steps,
            default_sampler=m.defaults.sampler,
            default_guidance_scale=float(m.defaults.guidance_scale),
            default_strength=DEFAULT_STRENGTH,
            default_inpaint_strength=DEFAULT_INPAINT_STRENGTH,
            samplers=tuple(sorted(SAMPLERS)),
            max_steps=self.max_steps,
            max_n=max_n,
            max_batch=max_batch,
            edits=self.vae_encoder is not None,
            inpainting_unet=self.inpainting_unet,
            loras=self.loras.names if self.loras else (),
        )

    def resolve(self, req: ImageRequest, limits: ModelLimits | None = None) -> ImageRequest:
        """Fill the package's defaults and validate; raises InvalidRequestError naming the param.
        No model work: the input image's header is read for its size, its pixels are not decoded."""
        limits = limits or self.limits()
        req = with_prompt_loras(req)
        validate_request(req, limits)
        d = self.manifest.defaults
        width, height = req.width, req.height
        if width is None:
            if req.is_edit:
                width, height = fit_size(*image_size(req.image, "image"), limits)
            else:
                width, height = parse_size(self.manifest.sizes.default)
        req = msgspec.structs.replace(
            req,
            model=req.model or self.manifest.name,
            width=width,
            height=height,
            seed=req.seed if req.seed is not None else secrets.randbits(62),
            steps=req.steps if req.steps is not None else d.steps,
            guidance_scale=req.guidance_scale if req.guidance_scale is not None else d.guidance_scale,
            guidance_rescale=req.guidance_rescale if req.guidance_rescale is not None else d.guidance_rescale,
            sampler=req.sampler or d.sampler,
            strength=default_strength(req, limits),
        )
        validate_request(req, limits)
        get_sampler(req.sampler)  # raises UnknownSamplerError listing the valid names
        self.plan(req.sampler, req.steps)  # a sampler may refuse a step count (InvalidRequestError)
        return req

    def plan(self, sampler_name: str, steps: int) -> SamplerPlan:
        key = (sampler_name, steps)
        if key not in self._plans:
            self._plans[key] = get_sampler(sampler_name).plan(self.schedule, steps)
        return self._plans[key]

    def encode_prompts(
        self, prompts: list[str], negatives: list[str], loras: list[tuple] | None = None
    ) -> list[dict[str, np.ndarray]]:
        """Text-encode all prompts and negative prompts of a set of requests in one batch per
        text-encoder LoRA variant (one batch when none changes a text encoder); `loras[i]` are
        request i's LoRA choices.

        Returns per request {"encoder_hidden_states": (2, L, D)[, "text_embeds": (2, P)]},
        row 0 the negative prompt, row 1 the prompt (diffusers' order).
        """
        groups: dict[tuple[Variant, ...], list[int]] = {}
        for i in range(len(prompts)):
            groups.setdefault(self._text_variants(loras[i] if loras else ()), []).append(i)
        result: list[dict[str, np.ndarray]] = [{} for _ in prompts]
        for variants, indices in groups.items():
            encoded = self._encode_batch([prompts[i] for i in indices], [negatives[i] for i in indices], variants)
            for i, emb in zip(indices, encoded):
                result[i] = emb
        return result

    def _text_variants(self, choices: tuple) -> tuple[Variant, ...]:
        """Each text encoder's LoRA variant for these choices."""
        if self.loras is None or not choices:
            return tuple(() for _ in self.text_encoders)
        return tuple(self.loras.variant(choices, encoder.name) for encoder in self.text_encoders)

    def unet_variant(self, req: ImageRequest) -> Variant:
        return self.loras.variant(req.loras, "unet") if self.loras is not None and req.loras else ()

    def _encode_batch(self, prompts: list[str], negatives: list[str], variants: tuple[Variant, ...]) -> list[dict[str, np.ndarray]]:
        n = len(prompts)
        texts = list(negatives) + list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder, variant in zip(self.tokenizers, self.text_encoders, variants):
            ids = tokenizer(texts)  # (2n, L) int64
            # Dynamic batch: one session serves every admission's count of prompts. Fixed per
            # count, a new count would build a session on the scheduler thread mid-admission.
            run = encoder.run({"input_ids": ids}, None, variant) if variant else encoder.run({"input_ids": ids})
            outputs = dict(zip(encoder.output_names, run))
            if self.is_xl:
                # SDXL conditions on the penultimate layer of both encoders (hidden_states[-2])
                layers = sorted(k for k in outputs if k.startswith("hidden_states."))
                hidden.append(outputs[f"hidden_states.{len(layers) - 2}"])
                if "text_embeds" in outputs:
                    pooled = outputs["text_embeds"]
            else:
                hidden.append(outputs["last_hidden_state"])
        states = np.concatenate(hidden, axis=-1).astype(np.float32)  # (2n, L, D)
        if self.is_xl and self.manifest.force_zeros_for_empty_prompt:
            for i, neg in enumerate(negatives):
                if not neg:
                    states[i] = 0.0
                    pooled[i] = 0.0
        result = []
        for i in range(n):
            emb = {"encoder_hidden_states": states[[i, n + i]]}
            if self.is_xl:
                emb["text_embeds"] = pooled[[i, n + i]].astype(np.float32)
            result.append(emb)
        return result

    def prepare(self, requests: list[ImageRequest], tags: list[Any] | None = None) -> list[Sample]:
        """Validate requests (all of them, before any work) and turn each into its n samples.

        Prompts are text-encoded in one batch; the input images of edits in one VAE-encoder
        batch per drawn size. A sample's tag is (tags[request], image index)."""
        resolved = [self.resolve(r) for r in requests]
        embeddings = self.encode_prompts(
            [r.prompt for r in resolved], [r.negative_prompt for r in resolved], [r.loras for r in resolved]
        )
        m = self.manifest
        drawn = [render_size(r.width, r.height, m.sizes) for r in resolved]
        edits = {i: read_edit_input(r, drawn[i]) for i, r in enumerate(resolved) if r.is_edit}
        samples = []
        for i, (req, emb) in enumerate(zip(resolved, embeddings)):
            shape = latent_shape(*drawn[i], m.latent_channels, m.vae_scale_factor)
            if self.is_xl:
                # (original size, crop top-left, target size), all = the requested size
                ids = np.array([req.height, req.width, 0, 0, req.height, req.width], dtype=np.float32)
                emb["time_ids"] = np.stack([ids, ids])
            plan = self.plan(req.sampler, req.steps)
            unet_variant = self.unet_variant(req)
            for k in range(req.n):
                rng = np.random.Generator(np.random.PCG64(req.seed + k))
                samples.append(
                    Sample(
                        request=req,
                        index=k,
                        sampler=get_sampler(req.sampler),
                        plan=plan,
                        guidance_scale=float(req.guidance_scale),
                        guidance_rescale=float(req.guidance_rescale),
                        embeddings=emb,
                        x=np.empty(shape, np.float32),  # set below: noise, or the noised input
                        rng=rng,
                        tag=(tags[i], k) if tags else None,
                        unet_variant=unet_variant,
                    )
                )
        self._start(samples, [edits.get(i) for i, req in enumerate(resolved) for _ in range(req.n)])
        return samples

    def _start(self, samples: list[Sample], inputs: list[EditInput | None]) -> None:
        """Each sample's starting latents (inputs[k]: sample k's edit input, None for text-to-image)."""
        encoded = self._encode_inputs([e for e in inputs if e is not None])
        for s, edit in zip(samples, inputs):
            if edit is None:
                noise = s.rng.standard_normal(s.shape, dtype=np.float32)  # the documented seed rule
                s.x = noise * np.float32(s.plan.init_noise_sigma)
            else:
                self._start_edit(s, edit, encoded[id(edit)])

    def _encode_inputs(self, inputs: list[EditInput]) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
        """id(input) -> VAE-encoder parameters (2C, h, w) of the input and of its masked input:
        one encoder call per drawn size, one row per request (its n images share it)."""
        rows: dict[tuple, list[np.ndarray]] = {}
        where: dict[int, tuple[tuple, int, int | None]] = {}
        for edit in inputs:
            if id(edit) in where:
                continue
            batch = rows.setdefault(edit.pixels.shape, [])
            first, second = len(batch), None
            batch.append(edit.pixels)
            if edit.mask_drawn is not None and self.inpainting_unet:
                second = len(batch)
                batch.append(edit.masked_pixels)
            where[id(edit)] = (edit.pixels.shape, first, second)
        outputs = {key: self.vae_encode(np.stack(batch)) for key, batch in rows.items()}
        return {
            key_id: (outputs[key][first], outputs[key][second] if second is not None else None)
            for key_id, (key, first, second) in where.items()
        }

    def vae_encode(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) in [-1, 1] -> (B, 2C, H/8, W/8) latent distribution parameters."""
        if self.vae_encoder is None:
            raise InvalidRequestError(
                f"{self.package} has no VAE encoder, so it cannot edit images; re-export it with this Kiln", param="image"
            )
        feeds = {"sample": pixels.astype(np.float32)}
        (parameters,) = self.vae_encoder.run(feeds, self._dims("vae_encoder", {"sample": pixels.shape}))
        return parameters

    def _dims(self, component: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
        """The values of a component's named spatial axes for inputs of these shapes: the key of
        its session per size (batch stays dynamic, as for the other components, so batch sizes share one)."""
        dims = {}
        for spec in self.manifest.components[component].inputs:
            if spec.name in shapes:
                for axis, dim in enumerate(spec.shape):
                    if isinstance(dim, str) and "batch" not in dim:
                        dims[dim] = int(shapes[spec.name][axis])
        return dims

    @staticmethod
    def _unet_dims(shape: tuple[int, ...]) -> dict[str, int]:
        """The UNet's session key for latents of `shape` (C, h, w)."""
        return {"height": shape[1], "width": shape[2]}

    @staticmethod
    def _vae_dims(shape: tuple[int, ...]) -> dict[str, int]:
        """The VAE decoder's session key for latents of `shape` (C, h, w)."""
        return {"latent_height": shape[1], "latent_width": shape[2]}

    # ---- the sessions a size needs (a worker builds them off its scheduler thread) --------

    def session_keys(self, req: ImageRequest) -> list[tuple[SessionCache, Key]]:
        """The cached sessions a resolved request will run on at its drawn size: what a worker
        builds in the background before admitting it, and holds while it runs. Empty where
        nothing is built per size (the other runtimes) or `background_builds` is off."""
        if not self.options.background_builds:
            return []
        width, height = render_size(req.width, req.height, self.manifest.sizes)
        keys = self._size_keys(width, height, encoder=req.is_edit or self.inpainting_unet, unet_variant=self.unet_variant(req))
        for encoder, variant in zip(self.text_encoders, self._text_variants(req.loras)):
            if variant and isinstance(encoder, ComponentSessions):  # the base's are pinned at warm-up
                keys.append((encoder.cache, encoder.key(None, variant)))
        return keys

    def _size_keys(
        self, width: int, height: int, encoder: bool, unet_variant: Variant = ()
    ) -> list[tuple[SessionCache, Key]]:
        """(cache, key) of the UNet (with its LoRA variant) and VAE decoder (and with `encoder`
        the VAE encoder: edits, and a 9-channel UNet's blank context) for images drawn at width x height."""
        m = self.manifest
        shape = latent_shape(width, height, m.latent_channels, m.vae_scale_factor)
        calls = [(self.unet, self._unet_dims(shape), unet_variant), (self.vae, self._vae_dims(shape), ())]
        if encoder and self.vae_encoder is not None:
            calls.append((self.vae_encoder, self._dims("vae_encoder", {"sample": (1, 3, height, width)}), ()))
        return [(c.cache, c.key(dims, variant)) for c, dims, variant in calls if isinstance(c, ComponentSessions)]

    def pin_size(self, width: int, height: int) -> None:
        """Keep the sessions of width x height requests, and the text encoders', for good (a
        worker's warm-up sizes): built now if missing, never evicted, not counted in the bound."""
        for encoder in self.text_encoders:
            if isinstance(encoder, ComponentSessions):
                encoder.cache.pin(encoder.key())
        for cache, key in self._size_keys(*render_size(width, height, self.manifest.sizes), encoder=True):
            cache.pin(key)

    def session_stats(self) -> dict[str, CacheStats]:
        """Per component with a session cache: what it holds and has built and evicted."""
        components = {c.name: c for c in (*self.text_encoders, self.unet, self.vae, self.vae_encoder) if c is not None}
        return {name: c.stats() for name, c in components.items() if isinstance(c, ComponentSessions)}

    def _scale_latents(self, sample: np.ndarray) -> np.ndarray:
        """A VAE sample (C, h, w) -> the UNet's latent scale (SDXL-family VAEs may normalise per channel)."""
        m = self.manifest
        mean, std = getattr(m, "vae_latents_mean", None), getattr(m, "vae_latents_std", None)
        if mean is not None and std is not None:
            shape = (-1, 1, 1)
            return ((sample - np.asarray(mean, np.float32).reshape(shape)) * np.float32(m.vae_scaling_factor)
                    / np.asarray(std, np.float32).reshape(shape)).astype(np.float32)
        return (sample * np.float32(m.vae_scaling_factor)).astype(np.float32)

    def _start_edit(self, s: Sample, edit: EditInput, encoded: tuple[np.ndarray, np.ndarray | None]) -> None:
        """Draws in the documented order (engine/edits.py), then the starting latents."""
        params, masked_params = encoded
        req = s.request
        inpaint = edit.mask_drawn is not None
        start, _ = edit_steps(req.steps, req.strength)
        full_strength = req.strength >= 1.0
        image_latents = None
        if not (inpaint and self.inpainting_unet and full_strength):  # 1. the input's latent sample
            image_latents = self._scale_latents(latent_sample(params, s.rng.standard_normal(s.shape, dtype=np.float32)))
        noise = s.rng.standard_normal(s.shape, dtype=np.float32)  # 2. the starting noise
        mask = unet_extra = None
        if inpaint:
            eps = s.rng.standard_normal(s.shape, dtype=np.float32)  # 3. the masked input's sample
            mask = latent_mask(edit.mask_drawn, self.manifest.vae_scale_factor)  # (1, h, w)
            if self.inpainting_unet:
                masked = self._scale_latents(latent_sample(masked_params, eps))
                unet_extra = np.concatenate([mask, masked]).astype(np.float32)  # (1 + C, h, w)
        if inpaint and full_strength:
            s.x = noise * np.float32(s.plan.init_noise_sigma)
        else:
            s.x = s.sampler.add_noise(image_latents, noise, s.plan, start)
        s.step = s.start = start
        s.edit = EditState(image_latents=image_latents, noise=noise, mask=mask, unet_extra=unet_extra, source=edit)

    def _unet_context(self, s: Sample) -> np.ndarray:
        """A 9-channel UNet's extra input (1 + C, h, w): the edit's, or for text-to-image "repaint
        everything" with the latents of a blank image (the encoder's mean: nothing to sample)."""
        if s.edit is not None and s.edit.unet_extra is not None:
            return s.edit.unet_extra
        blank = self._blank_context.get(s.shape)
        if blank is None:
            c, h, w = s.shape
            scale = self.manifest.vae_scale_factor
            params = self.vae_encode(np.zeros((1, 3, h * scale, w * scale), np.float32))[0]
            mean = self._scale_latents(np.split(params, 2, axis=0)[0])
            blank = self._blank_context[s.shape] = np.concatenate([np.ones((1, h, w), np.float32), mean])
        return blank

    # ---- one denoising step for a set of samples ------------------------------------------

    def denoise_step(self, samples: list[Sample]) -> None:
        """Advance every sample by one step with a single UNet call. All must share one shape and
        one UNet LoRA variant."""
        if not samples:
            return
        shape, variant = samples[0].shape, samples[0].unet_variant
        if any(s.shape != shape or s.unet_variant != variant for s in samples):
            raise ValueError("denoise_step takes samples of one latent shape and LoRA variant; group them first")
        rows_x, rows_t, picks = [], [], []
        slices = []
        for s in samples:
            x_in = s.sampler.scale_model_input(s.x, s.plan, s.step)  # (C, h, w)
            if self.inpainting_unet:
                x_in = np.concatenate([x_in, self._unet_context(s)])  # (2C + 1, h, w)
            t = np.float32(s.plan.timesteps[s.step])
            pick = [0, 1] if s.guided else [1]  # unguided samples skip the negative row
            picks.append(pick)
            slices.append((len(rows_x), len(pick)))
            for _ in pick:
                rows_x.append(x_in)
                rows_t.append(t)
        feeds = {
            "sample": np.stack(rows_x).astype(np.float32),  # (R, C, h, w)
            "timestep": np.asarray(rows_t, dtype=np.float32),  # (R,)
            **self._conditioning(samples, picks),
        }
        dims = self._unet_dims(shape)
        (out,) = self.unet.run(feeds, dims, variant) if variant else self.unet.run(feeds, dims)  # (R, C, h, w)
        for s, (start, count) in zip(samples, slices):
            if count == 2:
                guided = apply_guidance(out[start], out[start + 1], s.guidance_scale, s.guidance_rescale)
            else:
                guided = out[start]
            s.x, s.state = s.sampler.step(s.x, guided.astype(np.float32), s.plan, s.step, s.state, s.rng)
            s.step += 1
            if s.edit is not None and s.edit.mask is not None and not self.inpainting_unet:
                s.x = self._keep_unmasked(s)

    @staticmethod
    def _keep_unmasked(s: Sample) -> np.ndarray:
        """A plain UNet inpaints by resetting the kept region after every step to the input noised
        to the next step's level (clean after the last): diffusers' StableDiffusionInpaintPipeline."""
        edit = s.edit
        kept = edit.image_latents
        if s.step < s.plan.num_steps:
            kept = s.sampler.add_noise(edit.image_latents, edit.noise, s.plan, s.step)
        return ((1 - edit.mask) * kept + edit.mask * s.x).astype(np.float32)

    # ---- finished samples -> images ----------------------------------------------------

    def decode(self, samples: list[Sample], paste_back: bool = True) -> list[np.ndarray | KilnError]:
        """Finished samples of one shape -> (H, W, 3) uint8 images, or an error per sample.

        An inpainted image keeps the input outside its mask (`paste_back`, feathered over a few
        pixels): the VAE round trip and a plain UNet's blending alter the kept region otherwise."""
        if not samples:
            return []
        latents = self._unscale_latents(np.stack([s.x for s in samples]))
        (images,) = self.vae.run({"latent_sample": latents.astype(np.float32)}, self._vae_dims(latents.shape[1:]))
        results: list[np.ndarray | KilnError] = []
        for s, image in zip(samples, images):  # image: (3, H, W) in [-1, 1]
            if not (np.isfinite(s.x).all() and np.isfinite(image).all()):
                results.append(
                    NonFiniteOutputError(
                        f"the model produced NaN/inf for seed {s.seed} at {s.request.width}x{s.request.height}; "
                        f"the image was withheld (a package exported in fp16 may overflow: try fp32)"
                    )
                )
                continue
            pixels = np.clip(image / 2 + 0.5, 0.0, 1.0)
            rgb = (pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            if rgb.shape[:2] != (s.request.height, s.request.width):  # drawn smaller: see render_size
                rgb = np.asarray(Image.fromarray(rgb).resize((s.request.width, s.request.height), Image.LANCZOS))
            if paste_back and s.edit is not None and s.edit.source.mask_full is not None:
                rgb = feathered_paste(s.edit.source.original, rgb, s.edit.source.mask_full)
            results.append(rgb)
        return results

    def _unscale_latents(self, latents: np.ndarray) -> np.ndarray:
        """(B, C, h, w) UNet-scale latents -> what the VAE decoder takes (the inverse of _scale_latents)."""
        m = self.manifest
        mean, std = getattr(m, "vae_latents_mean", None), getattr(m, "vae_latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            return (latents * np.asarray(std, np.float32).reshape(shape) / np.float32(m.vae_scaling_factor)
                    + np.asarray(mean, np.float32).reshape(shape)).astype(np.float32)
        return latents / np.float32(m.vae_scaling_factor)

    # ---- all of it ---------------------------------------------------------------------

    def generate(
        self,
        requests: list[ImageRequest],
        on_step: Callable[[int, int], None] | None = None,
        paste_back: bool = True,
    ) -> list[np.ndarray]:
        """Make every request's n images, in order; samples of one shape share UNet calls.
        Raises on any error."""
        samples = self.prepare(requests)
        total = sum(s.total_steps for s in samples)
        finished = 0
        by_shape: dict[tuple, list[Sample]] = {}
        for s in samples:
            by_shape.setdefault((s.shape, s.unet_variant), []).append(s)
        for group in by_shape.values():
            running = list(group)
            while running:
                self.denoise_step(running)
                finished += len(running)
                if on_step:
                    on_step(finished, total)
                running = [s for s in running if not s.done]
        images: dict[int, np.ndarray] = {}
        for group in by_shape.values():
            for s, result in zip(group, self.decode(group, paste_back)):
                if isinstance(result, KilnError):
                    raise result
                images[id(s)] = result
        return [images[id(s)] for s in samples]


def load_pipeline(package: Path | str, threads: int = 0) -> Pipeline:
    return Pipeline(package, RuntimeOptions(threads=threads))


__all__ = ["ImageRequest", "InvalidRequestError", "Pipeline", "Sample", "initial_noise", "load_pipeline"]
