"""Text-to-image with a model package: tokenize -> text encoder -> denoise -> VAE decode -> RGB.

Built for step-level batching: `prepare` turns requests into independent `Sample`s, `denoise_step`
advances any set of samples of one latent shape by one step each with a single UNet call (every
sample at its own step, with its own sampler, guidance and generator), `decode` turns finished
samples into images. `generate` chains them for callers that want a plain function.

Seed -> latents rule (documented in the README; torch is not needed to reproduce it):
    rng = numpy.random.Generator(numpy.random.PCG64(seed))
    noise = rng.standard_normal((4, H/8, W/8), dtype=numpy.float32)
    latents = noise * plan.init_noise_sigma        # exactly diffusers' handling of given latents
and every later random draw of that image (ancestral samplers) comes from the same `rng`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgspec
import numpy as np
from PIL import Image

from engine.errors import InvalidRequestError, KilnError, NonFiniteOutputError, PackageError
from engine.guidance import apply_guidance
from engine.manifest import Manifest, read_manifest
from engine.request import MAX_STEPS, ImageRequest, validate_request
from engine.samplers import get_sampler
from engine.samplers.base import Sampler, SamplerPlan
from engine.schedules import NoiseSchedule
from engine.sessions import ComponentSessions, RuntimeOptions, check_provider
from engine.shapes import check_size, latent_shape, render_size
from engine.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One image in flight. Everything a denoising step needs, and nothing shared."""

    request: ImageRequest
    sampler: Sampler
    plan: SamplerPlan
    guidance_scale: float
    guidance_rescale: float
    embeddings: dict[str, np.ndarray]  # UNet conditioning inputs, row 0 = negative, row 1 = prompt
    x: np.ndarray  # (C, h, w) float32 latents
    rng: np.random.Generator
    step: int = 0
    state: Any = None
    tag: Any = None  # the caller's handle (the worker keeps its request id here)
    started: float = field(default_factory=time.perf_counter)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.x.shape

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

    def __new__(cls, package: Path | str, *args, **kwargs):
        if cls is Pipeline:
            cls = runtime_class(read_manifest(Path(package)).target)
        return super().__new__(cls)

    def __init__(self, package: Path | str, options: RuntimeOptions | None = None, max_steps: int = MAX_STEPS):
        self.package = Path(package)
        self.manifest: Manifest = read_manifest(self.package)
        self.options = options or RuntimeOptions()
        self.providers = self._providers()
        self.max_steps = max_steps
        m = self.manifest
        self.schedule = NoiseSchedule.from_scheduler_config(m.scheduler_config)
        self.tokenizers = [PromptTokenizer(self.package, spec) for spec in m.tokenizers]
        self.text_encoders = [self._component(name) for name in ("text_encoder", "text_encoder_2") if name in m.components]
        if len(self.text_encoders) != len(self.tokenizers):
            raise PackageError(f"{self.package}: {len(self.tokenizers)} tokenizers for {len(self.text_encoders)} text encoders")
        self.unet = self._component("unet")
        self.vae = self._component("vae_decoder")
        self.is_xl = m.family == "sdxl"
        self._plans: dict[tuple[str, int], SamplerPlan] = {}

    # ---- what other runtimes replace (engine/openvino/, engine/cuda/, engine/tensorrt/) -----

    def _providers(self) -> list[str]:
        """The onnxruntime providers for this package; refuses one this machine cannot run."""
        return check_provider(self.manifest.target)

    def _component(self, name: str) -> ComponentSessions:
        """What runs one component: anything with `run(feeds, fixed_dims) -> outputs` and `output_names`."""
        return ComponentSessions(self.package, name, self.manifest.components[name], self.providers, self.options)

    def _conditioning(self, samples: list[Sample], picks: list[list[int]]) -> dict[str, np.ndarray]:
        """The UNet's conditioning rows for one step: each sample's embeddings at its picks, stacked."""
        rows: dict[str, list[np.ndarray]] = {k: [] for k in samples[0].embeddings}
        for s, p in zip(samples, picks):
            for k in rows:
                rows[k].extend(s.embeddings[k][i] for i in p)
        return {k: np.stack(v) for k, v in rows.items()}  # (R, ...) each

    # ---- requests -> samples -------------------------------------------------------------

    def resolve(self, req: ImageRequest) -> ImageRequest:
        """Fill the package's defaults and validate; raises InvalidRequestError naming the param."""
        d = self.manifest.defaults
        req = msgspec.structs.replace(
            req,
            steps=req.steps if req.steps is not None else d.steps,
            guidance_scale=req.guidance_scale if req.guidance_scale is not None else d.guidance_scale,
            guidance_rescale=req.guidance_rescale if req.guidance_rescale is not None else d.guidance_rescale,
            sampler=req.sampler or d.sampler,
        )
        validate_request(req, self.max_steps)
        check_size(req.width, req.height, self.manifest.sizes)
        get_sampler(req.sampler)  # raises UnknownSamplerError listing the valid names
        return req

    def plan(self, sampler_name: str, steps: int) -> SamplerPlan:
        key = (sampler_name, steps)
        if key not in self._plans:
            self._plans[key] = get_sampler(sampler_name).plan(self.schedule, steps)
        return self._plans[key]

    def encode_prompts(self, prompts: list[str], negatives: list[str]) -> list[dict[str, np.ndarray]]:
        """Text-encode all prompts and negative prompts of a set of requests in one batch each.

        Returns per request {"encoder_hidden_states": (2, L, D)[, "text_embeds": (2, P)]},
        row 0 the negative prompt, row 1 the prompt (diffusers' order).
        """
        n = len(prompts)
        texts = list(negatives) + list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(texts)  # (2n, L) int64
            outputs = dict(zip(encoder.output_names, encoder.run({"input_ids": ids}, {"batch_size": len(texts)})))
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
        """Validate requests (all of them, before any work) and turn them into samples at step 0."""
        resolved = [self.resolve(r) for r in requests]
        embeddings = self.encode_prompts([r.prompt for r in resolved], [r.negative_prompt for r in resolved])
        m = self.manifest
        samples = []
        for k, (req, emb) in enumerate(zip(resolved, embeddings)):
            draw_w, draw_h = render_size(req.width, req.height, m.sizes)
            shape = latent_shape(draw_w, draw_h, m.latent_channels, m.vae_scale_factor)
            if self.is_xl:
                # (original size, crop top-left, target size), all = the requested size
                ids = np.array([req.height, req.width, 0, 0, req.height, req.width], dtype=np.float32)
                emb["time_ids"] = np.stack([ids, ids])
            plan = self.plan(req.sampler, req.steps)
            noise, rng = initial_noise(req.seed, shape)
            samples.append(
                Sample(
                    request=req,
                    sampler=get_sampler(req.sampler),
                    plan=plan,
                    guidance_scale=float(req.guidance_scale),
                    guidance_rescale=float(req.guidance_rescale),
                    embeddings=emb,
                    x=noise * np.float32(plan.init_noise_sigma),
                    rng=rng,
                    tag=tags[k] if tags else None,
                )
            )
        return samples

    # ---- one denoising step for a set of samples ------------------------------------------

    def denoise_step(self, samples: list[Sample]) -> None:
        """Advance every sample by one step with a single UNet call. All must share one shape."""
        if not samples:
            return
        shape = samples[0].shape
        if any(s.shape != shape for s in samples):
            raise ValueError("denoise_step takes samples of one latent shape; group them first")
        rows_x, rows_t, picks = [], [], []
        slices = []
        for s in samples:
            x_in = s.sampler.scale_model_input(s.x, s.plan, s.step)
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
        (out,) = self.unet.run(feeds, {"height": shape[1], "width": shape[2]})  # (R, C, h, w)
        for s, (start, count) in zip(samples, slices):
            if count == 2:
                guided = apply_guidance(out[start], out[start + 1], s.guidance_scale, s.guidance_rescale)
            else:
                guided = out[start]
            s.x, s.state = s.sampler.step(s.x, guided.astype(np.float32), s.plan, s.step, s.state, s.rng)
            s.step += 1

    # ---- finished samples -> images ----------------------------------------------------

    def decode(self, samples: list[Sample]) -> list[np.ndarray | KilnError]:
        """Finished samples of one shape -> (H, W, 3) uint8 images, or an error per sample."""
        if not samples:
            return []
        latents = np.stack([s.x for s in samples]) / np.float32(self.manifest.vae_scaling_factor)
        h, w = latents.shape[2:]
        (images,) = self.vae.run({"latent_sample": latents.astype(np.float32)}, {"latent_height": h, "latent_width": w})
        results: list[np.ndarray | KilnError] = []
        for s, image in zip(samples, images):  # image: (3, H, W) in [-1, 1]
            if not (np.isfinite(s.x).all() and np.isfinite(image).all()):
                results.append(
                    NonFiniteOutputError(
                        f"the model produced NaN/inf for seed {s.request.seed} at {s.request.width}x{s.request.height}; "
                        f"the image was withheld (a package exported in fp16 may overflow: try fp32)"
                    )
                )
                continue
            pixels = np.clip(image / 2 + 0.5, 0.0, 1.0)
            rgb = (pixels.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            if rgb.shape[:2] != (s.request.height, s.request.width):  # drawn smaller: see render_size
                rgb = np.asarray(Image.fromarray(rgb).resize((s.request.width, s.request.height), Image.LANCZOS))
            results.append(rgb)
        return results

    # ---- all of it ---------------------------------------------------------------------

    def generate(
        self,
        requests: list[ImageRequest],
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[np.ndarray]:
        """Make every request's image; samples of one shape share UNet calls. Raises on any error."""
        samples = self.prepare(requests)
        total = sum(s.plan.num_steps for s in samples)
        finished = 0
        by_shape: dict[tuple, list[Sample]] = {}
        for s in samples:
            by_shape.setdefault(s.shape, []).append(s)
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
            for s, result in zip(group, self.decode(group)):
                if isinstance(result, KilnError):
                    raise result
                images[id(s)] = result
        return [images[id(s)] for s in samples]


def load_pipeline(package: Path | str, threads: int = 0) -> Pipeline:
    return Pipeline(package, RuntimeOptions(threads=threads))


__all__ = ["ImageRequest", "InvalidRequestError", "Pipeline", "Sample", "initial_noise", "load_pipeline"]
