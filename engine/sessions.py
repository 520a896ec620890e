"""onnxruntime sessions for a package's components, specialised per resolution, weights shared.

Fixed shapes let onnxruntime plan memory and pick kernels for one resolution, which is faster on
CPU than dynamic height/width. Each specialised session would normally read its own copy of the
weights; instead every component's weights.bin is mapped once and its buffers are handed to each
session with `SessionOptions.add_initializer`, so N resolutions cost one copy of the weights.
What each size still costs on its own (graph, kernels, memory plan) is bounded by a
least-recently-used cache per component (engine/session_cache.py, `RuntimeOptions.max_sessions`).

LoRAs ride on the same route: a session for a LoRA variant (engine/lora/variants.py) is given
the variant's changed weights with `add_initializer` and the base's buffers for every other
weight, so a variant costs its changed tensors (shared by its sessions of every size, freed with
the last of them) plus what any session costs. Its sessions are cached beside the base's, keyed
by size and variant, under the same bound.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import typing
import weakref
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engine.errors import IncompatiblePackageError, PackageError
from engine.manifest import Component
from engine.session_cache import CacheStats, Key, SessionCache, key_of

if typing.TYPE_CHECKING:
    from engine.lora.variants import LoraLibrary, Variant

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
OTHER_RUNTIMES = {"openvino": "OpenVINO (engine/openvino/)", "tensorrt": "TensorRT (engine/tensorrt/)"}


@dataclass(frozen=True)
class GpuOptions:
    """How `cuda` packages run on onnxruntime's CUDA execution provider (engine/cuda/)."""

    device_id: int = 0
    io_binding: bool = True  # False: plain session.run with host arrays (to measure what binding buys)
    # CUDA graphs captured per component, one per (batch rows, latent size) in order of first use;
    # later shapes run without a graph. 0 turns them off. Each graph keeps its activations.
    cuda_graphs: int = 8
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # "HEURISTIC" starts faster, may run slower
    gpu_mem_limit_gib: float = 0.0  # 0: no limit for onnxruntime's CUDA arena


LORA_PREFIX = "lora:"  # a session key's LoRA entries: ("lora:NAME", scale)
DEFAULT_MAX_SESSIONS = 4
MAX_SESSIONS_ENV = "KILN_MAX_SESSIONS"


def _max_sessions_from_env() -> int:
    text = os.environ.get(MAX_SESSIONS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_SESSIONS
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{MAX_SESSIONS_ENV} must be a whole number of sessions (for example 4), got {text!r}") from None


@dataclass(frozen=True)
class RuntimeOptions:
    threads: int = 0  # 0: onnxruntime's default (one per physical core)
    # "basic" | "extended" | "all". "all" adds onnxruntime's NCHWc layout transform, which writes
    # a reordered copy of every conv weight into each session: with a session per resolution that
    # is a copy of most of the UNet per size (SD 1.5: +2.5 GB a size), for about 4 % speed.
    optimization: str = "extended"
    cpu_mem_arena: bool = True
    fixed_shapes: bool = True  # specialise a session per resolution (faster on CPU)
    share_weights: bool = True  # False only to measure what sharing saves
    shared_arena: bool = True  # one CPU memory arena for every session of the process
    # onnxruntime repacks MatMul weights for its kernels; with shared (caller-owned) weights the
    # repacked copies come on top of the originals, per session. Off: on the SD 1.5 UNet at
    # 256x256 it saved 0.8 GB of peak RSS and cost no measurable time (4.56 vs 4.57 s a step).
    prepack: bool = False
    gpu: GpuOptions = GpuOptions()  # used by `cuda` packages only
    # `openvino` packages only: "auto" lets OpenVINO choose (bf16 on CPUs with native bf16 —
    # AVX512-BF16 or AMX — else fp32), "f32" forces fp32 (closest to diffusers), "bf16" refuses
    # to load on a CPU without it.
    openvino_precision: str = field(default_factory=lambda: os.environ.get("KILN_OPENVINO_PRECISION", "auto"))
    # `openvino` packages only: compiled kernels OpenVINO's CPU plugin keeps per input shape, per
    # component (its CPU_RUNTIME_CACHE_CAPACITY, least recently used dropped; OpenVINO's own
    # default is 5000). One compiled model serves every size, but each new shape adds kernels:
    # the tiny SD 1.x model over 200 sizes grew to 1,053 MiB with 5000, 644 MiB with 1000. On the
    # bundled model a UNet shape takes about a dozen entries: 16 shapes in turn ran as fast with
    # 200 as with 5000 (58 vs 56 ms a call), 2x slower with 100, 3.7x with 0.
    openvino_cache_entries: int = 1000
    # Fixed-shape sessions kept per component besides the warm-up sizes (pinned for good), least
    # recently used evicted first. Each size costs its own graph, kernels and memory plan on top
    # of the shared weights (SD 1.5: about 250 MB), and sizes are the client's choice. A worker
    # admits a request of a size not kept only when a slot is free or idle. KILN_MAX_SESSIONS
    # sets the default. `cpu` packages only: the other runtimes hold one model for every size.
    max_sessions: int = field(default_factory=_max_sessions_from_env)
    # A worker builds a new size's sessions on a background thread while the other sizes keep
    # stepping. False: built on the scheduler thread at the size's first step (to measure what
    # the background buys).
    background_builds: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_sessions, bool) or not isinstance(self.max_sessions, int) or self.max_sessions < 1:
            raise ValueError(
                f"max_sessions ({MAX_SESSIONS_ENV}) must be at least 1 session per component, got {self.max_sessions!r}"
            )
        if self.openvino_cache_entries < 0:
            raise ValueError(f"openvino_cache_entries must be 0 or more, got {self.openvino_cache_entries}")


_arena_lock = threading.Lock()
_arena_registered = False


def _register_shared_arena() -> None:
    """Register one process-wide CPU arena that sessions opt into with `use_env_allocators`.

    Each session's own arena keeps the peak activations of its resolution for good, so five sizes
    held five peaks; a shared arena holds only the largest.
    """
    global _arena_registered
    with _arena_lock:
        if _arena_registered:
            return
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
        _arena_registered = True


def check_provider(target: str) -> list[str]:
    """The providers to run a `target` package with; refuse if this machine has none of them."""
    if target not in PROVIDERS:
        raise IncompatiblePackageError(
            f"this engine runs packages for {', '.join(PROVIDERS)} with onnxruntime and for "
            f"{', '.join(OTHER_RUNTIMES)} with {' and '.join(OTHER_RUNTIMES.values())}; the package targets {target!r}"
        )
    wanted = PROVIDERS[target][0]
    available = ort.get_available_providers()
    if wanted not in available:
        raise IncompatiblePackageError(
            f"the package was exported for {target}, which needs onnxruntime's {wanted}; this machine has "
            f"{', '.join(available)} (install onnxruntime-gpu with CUDA, or export TARGET=cpu)"
        )
    return PROVIDERS[target]


class SharedWeights:
    """A component's initializers mapped from weights.bin once, as OrtValues any session can use."""

    def __init__(self, package: Path | None, component: Component | None):
        self.values: dict[str, ort.OrtValue] = {}
        self.arrays: dict[str, np.ndarray] = {}  # keep the buffers alive as long as the sessions
        if component is None or component.weights_file is None:
            return
        weights = package / component.weights_file
        index_path = weights.with_name("weights.json")
        try:
            index = json.loads(index_path.read_text())
            blob = np.memmap(weights, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise PackageError(f"cannot read the weights of {component.file}: {e}") from None
        for name, entry in index.items():
            raw = blob[entry["offset"] : entry["offset"] + entry["length"]]
            if raw.shape[0] != entry["length"]:
                raise PackageError(f"{weights} is truncated: {name} runs past its end; re-export the package")
            # Zero-copy: the tensor is a read-only view of the mapped file, so its pages are the
            # page cache's — shared by every session here and by other workers on the host.
            array = np.frombuffer(raw, dtype=entry["dtype"]).reshape(entry["shape"])
            self.arrays[name] = array
            self.values[name] = ort.OrtValue.ortvalue_from_numpy(array)

    @classmethod
    def empty(cls) -> "SharedWeights":
        """No shared buffers: each session reads weights.bin itself (to measure what sharing saves)."""
        return cls(None, None)


class VariantWeights:
    """The weights one LoRA variant changes in one component, as OrtValues over their own arrays.

    Every session of the variant keeps a reference (onnxruntime needs an initializer's buffer for
    the session's life), so they are freed with the last session of the variant."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
        self.nbytes = sum(a.nbytes for a in arrays.values())


class ComponentSessions:
    """One component: a session per fixed-shape key, created on first use, weights shared, kept in
    a bounded cache (`self.cache`: least recently used evicted, warm-up sizes pinned)."""

    def __init__(
        self,
        package: Path,
        name: str,
        component: Component,
        providers: list[str],
        options: RuntimeOptions,
        builder: Executor | None = None,
        bounded: bool = True,
        loras: LoraLibrary | None = None,
    ):
        """`builder`: the thread that builds sessions in the background (`cache.start_build`).
        `bounded=False` keeps every session: for a caller that keeps the sessions it is given.
        `loras`: where a variant's changed weights come from (None: no LoRAs)."""
        self.name = name
        self.path = package / component.file
        if not self.path.is_file():
            raise PackageError(f"{self.path} is missing from the package; re-export it")
        self.component = component
        self.providers = providers
        self.options = options
        self.package = package
        self.weights = SharedWeights(package, component) if options.share_weights else SharedWeights.empty()
        self.loras = loras
        # variant -> its changed weights while a session of it lives (see VariantWeights)
        self._variants: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._variants_lock = threading.Lock()
        self.cache: SessionCache[ort.InferenceSession] = SessionCache(
            name,
            self._build,
            options.max_sessions if bounded else None,
            builder,
        )
        self.input_names = [spec.name for spec in component.inputs]
        self.output_names = [spec.name for spec in component.outputs]

    def key(self, fixed_dims: dict[str, int] | None = None, variant: Variant = ()) -> Key:
        """The cache key of a call with these fixed dimensions (() without fixed shapes) and LoRA
        variant: the dimensions, then ("lora:NAME", scale) per LoRA."""
        dims = key_of(fixed_dims if self.options.fixed_shapes else None)
        return dims + tuple((LORA_PREFIX + name, scale) for name, scale in variant)

    def _build(self, key: Key) -> ort.InferenceSession:
        dims = {name: int(value) for name, value in key if not name.startswith(LORA_PREFIX)}
        variant = tuple((name[len(LORA_PREFIX) :], value) for name, value in key if name.startswith(LORA_PREFIX))
        if not variant:
            return self._create(dims)  # looked up per build, so a test can wrap _create
        return self._create(dims, variant)

    def variant_weights(self, variant: Variant) -> VariantWeights:
        """The variant's changed weights: shared with its sessions alive, else computed now."""
        with self._variants_lock:
            found = self._variants.get(variant)
            if found is None:
                if self.loras is None:
                    raise PackageError(f"{self.name}: this runtime was started without the package's LoRAs")
                base = self.weights.arrays if self.options.share_weights else SharedWeights(self.package, self.component).arrays
                found = VariantWeights(self.loras.changed_weights(self.name, variant, base))
                self._variants[variant] = found
                log.info("%s: %d weights changed by %s (%.1f MiB)", self.name, len(found.values),
                         ", ".join(f"{n}:{s:g}" for n, s in variant), found.nbytes / 2**20)
            return found

    def variant_bytes(self) -> int:
        """Bytes held by the changed weights of the variants alive now."""
        with self._variants_lock:
            return sum(v.nbytes for v in list(self._variants.values()))

    def session(self, fixed_dims: dict[str, int] | None = None, variant: Variant = ()) -> ort.InferenceSession:
        """The session for `fixed_dims` (and LoRA variant), not held: only for a caller that keeps
        every session it is given (`bounded=False`), since an evicted one stays alive while referenced."""
        with self.cache.use(self.key(fixed_dims, variant)) as sess:
            return sess

    def _create(self, fixed_dims: dict[str, int], variant: Variant = ()) -> ort.InferenceSession:
        changed = self.variant_weights(variant) if variant else None
        so = ort.SessionOptions()
        optimization = self.options.optimization
        if variant and optimization == "all":
            # At "all", onnxruntime 1.32 builds a Conv's reordered (NCHWc) weight from the model's
            # own initializer, not from one given with add_initializer: a LoRA on a convolution
            # would be silently dropped (seen on conv_in). "extended" honours every override.
            optimization = "extended"
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        if self.options.threads:
            so.intra_op_num_threads = self.options.threads
        so.inter_op_num_threads = 1
        so.enable_cpu_mem_arena = self.options.cpu_mem_arena
        if self.options.shared_arena and self.options.cpu_mem_arena and self.providers[0] == "CPUExecutionProvider":
            _register_shared_arena()
            so.add_session_config_entry("session.use_env_allocators", "1")
        so.log_severity_level = 3
        if not self.options.prepack:
            so.add_session_config_entry("session.disable_prepacking", "1")
        for dim, value in fixed_dims.items():
            so.add_free_dimension_override_by_name(dim, int(value))
        if self.options.share_weights or changed is not None:
            for name, value in self.weights.values.items():
                if changed is None or name not in changed.values:
                    so.add_initializer(name, value)
        if changed is not None:
            for name, value in changed.values.items():
                so.add_initializer(name, value)
        log.debug("creating %s session for %s", self.name, fixed_dims or "dynamic shapes")
        try:
            session = ort.InferenceSession(str(self.path), so, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise PackageError(f"onnxruntime cannot load {self.path}: {e}") from None
        if changed is not None:
            session._kiln_variant_weights = changed  # the buffers live as long as the session
        return session

    def run(
        self, feeds: dict[str, np.ndarray], fixed_dims: dict[str, int] | None = None, variant: Variant = ()
    ) -> list[np.ndarray]:
        """Outputs in `output_names` order. The session is held for the call, so it is never
        evicted under it; a size (or variant) not cached is built here, on the caller's thread."""
        with self.cache.use(self.key(fixed_dims, variant)) as sess:
            return sess.run(self.output_names, feeds)

    @property
    def loaded_shapes(self) -> list[Key]:
        return self.cache.keys()

    def stats(self) -> CacheStats:
        return self.cache.stats()


def default_threads() -> int:
    return int(os.environ.get("KILN_THREADS", "0"))
