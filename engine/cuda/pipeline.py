"""The pipeline for `cuda` packages: IOBinding on onnxruntime's CUDA execution provider.

NOT YET RUN ON A GPU — see engine/cuda/__init__.py for what is tested and what is not.

What moves between host and device, per denoising step of R UNet rows at latent size h x w:
  - text embeddings: uploaded when the set of samples in the batch changes, not per step
    (`_conditioning` hands the binding the same read-only arrays while the batch is unchanged);
  - latents in (R, 4, h, w) and timesteps (R,) float32: uploaded every step;
  - the UNet output (R, 4, h, w) float32: copied back every step, because the samplers are numpy
    functions on the host. At 512x512 with CFG that is 128 KiB each way, tens of microseconds
    against a step of milliseconds; `benchmarks/gpu_check.py` measures the share (the issue's
    bound is 2 % of a step) from `BoundComponent.stats`.
Finished images come back once, from the VAE decoder.

LoRAs: a variant runs on a session of its own per component (engine/cuda/variants.py), with the
variant's changed fp16 weights given by `add_initializer` and every other weight read from the
package; export/cuda_fp16.py keeps those weights findable by their torch parameter names.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import onnxruntime as ort

from engine.cuda.binding import BoundComponent
from engine.cuda.variants import DISABLED_OPTIMIZERS, VariantSessions
from engine.errors import PackageError
from engine.manifest import Component
from engine.pipeline import Pipeline, Sample
from engine.lora.layouts import COMPONENTS as LORA_COMPONENTS
from engine.lora.variants import Variant
from engine.sessions import ComponentSessions, GpuOptions, SharedWeights, VariantWeights, check_provider

log = logging.getLogger(__name__)

# Components whose shapes repeat step after step and so are worth a CUDA graph. Text encoders
# run once per request with a varying batch; a graph would be captured for nothing.
GRAPHED = ("unet", "vae_decoder")


def cuda_provider_options(gpu: GpuOptions, cuda_graph: bool) -> dict[str, str]:
    """onnxruntime CUDA execution provider options for one session."""
    options = {
        "device_id": str(gpu.device_id),
        # Grow the arena by what is asked, not in powers of two: a 1024x1024 UNet step would
        # otherwise reserve up to twice its activations.
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": gpu.cudnn_conv_algo_search,
        "cudnn_conv_use_max_workspace": "1",
        "do_copy_in_default_stream": "1",
        "enable_cuda_graph": "1" if cuda_graph else "0",
    }
    if gpu.gpu_mem_limit_gib > 0:
        options["gpu_mem_limit"] = str(int(gpu.gpu_mem_limit_gib * 2**30))
    return options


class ResidentConditioning(Pipeline):
    """A pipeline whose runtime keeps inputs on the device while the caller passes the same
    read-only arrays: `_conditioning` returns the same arrays while a batch is unchanged."""

    def __init__(self, *args, **kwargs):
        self._memo_lock = threading.Lock()
        self._memo: dict[tuple, tuple[list[Sample], list[list[int]], dict[str, np.ndarray]]] = {}
        super().__init__(*args, **kwargs)

    def _conditioning(self, samples: list[Sample], picks: list[list[int]]) -> dict[str, np.ndarray]:
        """The same read-only arrays while the batch holds the same samples, so they stay uploaded.

        One memo per latent shape, since the scheduler interleaves shapes. It keeps the samples
        themselves (not their ids, which a new sample could reuse) until the batch changes.
        """
        shape = samples[0].shape
        with self._memo_lock:
            memo = self._memo.get(shape)
            if memo and len(memo[0]) == len(samples) and all(a is b for a, b in zip(memo[0], samples)) and memo[1] == picks:
                return memo[2]
        arrays = super()._conditioning(samples, picks)
        for array in arrays.values():
            array.flags.writeable = False
        with self._memo_lock:
            self._memo[shape] = (list(samples), [list(p) for p in picks], arrays)
        return arrays


class BoundPipeline(ResidentConditioning):
    """Pipeline whose components run through IOBinding on `device`.

    On "cpu" it runs a cpu package's sessions through the same binding code, which is how that
    code is tested without a GPU; `CudaPipeline` is the one the engine picks for cuda packages.
    """

    # The cpu twin serves LoRAs through ComponentSessions' variant sessions; CudaPipeline through
    # one extra CUDA session per variant (README "LoRAs on GPUs").
    serves_loras = True

    device = "cpu"

    def _component(self, name: str) -> BoundComponent:
        component = self.manifest.components[name]
        # Unbounded: BoundComponent keeps an IOBinding per session it is given, for good, so an
        # evicted session would live on in it (and its id could be reused by a new one).
        sessions = ComponentSessions(
            self.package, name, component, self.providers, self.options, bounded=False, loras=self.loras
        )
        return BoundComponent(name, sessions.session, *_io_names(component), device="cpu")


class CudaPipeline(BoundPipeline):
    """A `cuda` package (fp16, fused by onnxruntime's SD optimiser) on the CUDA execution provider.

    One session per component with dynamic shapes (the weights are on the GPU once), IOBinding
    per shape, and CUDA graphs for the first `GpuOptions.cuda_graphs` UNet and VAE shapes.
    """

    device = "cuda"

    def __init__(self, *args, **kwargs):
        self.graph_refusals: dict[str, str] = {}  # component -> why onnxruntime refused CUDA graphs
        super().__init__(*args, **kwargs)

    def _providers(self) -> list[str]:
        providers = check_provider(self.manifest.target)  # refuses without CUDAExecutionProvider
        if hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds CUDA and cuDNN from the nvidia-* wheels PyTorch installed (GPU.md).
            ort.preload_dlls()
        return providers

    def _component(self, name: str):
        gpu = self.options.gpu
        graphs = gpu.cuda_graphs if (name in GRAPHED and gpu.io_binding) else 0
        try:
            session = self._cuda_session(name, graphs > 0)
        except PackageError as e:
            if not graphs or "graph" not in str(e).lower():
                raise
            # onnxruntime refuses CUDA graphs when any node runs elsewhere (a Memcpy to the CPU):
            # run this component without them rather than not at all.
            log.warning("%s: onnxruntime cannot use CUDA graphs here, running without them: %s", name, e)
            self.graph_refusals[name] = str(e)
            graphs, session = 0, self._cuda_session(name, False)
        variants = self._variant_sessions(name) if self.loras is not None and name in LORA_COMPONENTS else None
        if not gpu.io_binding:
            return _PlainSession(name, session, variants)
        bound = BoundComponent(
            name, lambda _dims, variant=(): variants.session(variant) if variant else session,
            *_io_names(self.manifest.components[name]),
            device="cuda", device_id=gpu.device_id, graph_slots=graphs,
            max_bound=self.options.max_sessions,  # the same bound as the CPU's sessions per size
        )
        if variants is not None:
            variants.on_drop = bound.forget
        return bound

    def _variant_sessions(self, name: str) -> VariantSessions[ort.InferenceSession]:
        """At most `max_sessions` LoRA variant sessions of component `name`, each built with the
        variant's changed weights (W + deltas, fp16 like the package) over the package's own."""
        base = SharedWeights(self.package, self.manifest.components[name]).arrays  # mapped, read per variant

        def build(variant: Variant) -> ort.InferenceSession:
            changed = VariantWeights(self.loras.changed_weights(name, variant, base))
            session = self._cuda_session(name, False, changed)
            session._kiln_variant_weights = changed  # onnxruntime uses the buffers for the session's life
            return session

        return VariantSessions(name, build, self.options.max_sessions)

    def _cuda_session(self, name: str, cuda_graph: bool, changed: VariantWeights | None = None) -> ort.InferenceSession:
        path = self.package / self.manifest.components[name].file
        if not path.is_file():
            raise PackageError(f"{path} is missing from the package; re-export it")
        so = ort.SessionOptions()
        # The graphs were fused offline; onnxruntime's own passes still fold constants and pick
        # kernels. (The CPU path's reason to stop at "extended" — NCHWc weight copies per
        # session — is a CPU transform, and there is one session per component here.)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        disabled = None
        if changed is not None:
            # A LoRA variant: its changed weights replace the package's by name, and constant
            # folding is off (engine/cuda/variants.py, DISABLED_OPTIMIZERS). On CPU, "all" also
            # built a Conv's reordered weight from the model's initializer, not the one given
            # here (engine/sessions.py); whether CUDA's "all" passes honour add_initializer is
            # still to verify on a GPU, so variants stop at "extended".
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            disabled = DISABLED_OPTIMIZERS
            for weight, value in changed.values.items():
                so.add_initializer(weight, value)
        so.log_severity_level = 3
        options = cuda_provider_options(self.options.gpu, cuda_graph)
        try:
            # weights.bin is read by onnxruntime itself and copied to the GPU once per component.
            return ort.InferenceSession(
                str(path), so, providers=[("CUDAExecutionProvider", options), "CPUExecutionProvider"],
                disabled_optimizers=disabled,
            )
        except Exception as e:  # onnxruntime's Fail/RuntimeException: missing CUDA/cuDNN, no GPU, OOM
            raise PackageError(
                f"onnxruntime cannot create a CUDA session for {path}: {e} "
                f"(onnxruntime-gpu needs the CUDA and cuDNN libraries it was built for; "
                f"CUDA graphs can be turned off with GpuOptions(cuda_graphs=0))"
            ) from None


def _io_names(component: Component) -> tuple[list[str], list[str]]:
    return [t.name for t in component.inputs], [t.name for t in component.outputs]


class _PlainSession:
    """A CUDA session run with host arrays (no IOBinding): the baseline IOBinding is measured against."""

    def __init__(self, name: str, session: ort.InferenceSession, variants: VariantSessions | None = None):
        self.name = name
        self.session = session
        self.variants = variants
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], fixed_dims: dict[str, int] | None = None, variant: Variant = ()) -> list[np.ndarray]:
        session = self.variants.session(variant) if variant else self.session
        return session.run(self.output_names, feeds)
