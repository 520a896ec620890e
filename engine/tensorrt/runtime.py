"""Drive TensorRT engines with CuPy device buffers: load -> allocate -> infer, no torch.

NOT YET RUN: written against the TensorRT 10 Python API (named tensors, `execute_async_v3`);
TensorRT cannot be installed where this project has GPUs.

One `TensorRTComponent` holds a component's engines (one per size, or one for every size) and
offers ComponentSessions' `run(feeds, fixed_dims)`. Inputs are uploaded on one CUDA stream; an
input whose caller hands the same read-only array as last time stays on the device (the text
embeddings between steps); outputs are copied back once the stream is done. A batch larger
than the engine's profile is run in slices along the batch axis.

LoRAs: a component whose engines were built refittable is given a `ComponentRefit`
(engine/tensorrt/refit.py), and `run(feeds, fixed_dims, variant)` switches the engine it picks
to the call's variant first, under the same lock, so no call runs on half-written weights.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import EngineError, PackageError
from engine.lora.variants import Variant
from engine.tensorrt.cache import EngineEntry
from engine.tensorrt.refit import ComponentRefit, EngineWeights

log = logging.getLogger(__name__)


@dataclass
class _Engine:
    entry: EngineEntry
    engine: object  # tensorrt.ICudaEngine
    context: object  # tensorrt.IExecutionContext
    max_rows: int
    resident: dict[str, tuple[np.ndarray, object]] = field(default_factory=dict)  # input -> (host, device)
    weights: EngineWeights | None = None  # the LoRA variant it holds; None: not refittable


class TensorRTComponent:
    def __init__(self, package: Path, name: str, entries: list[EngineEntry], input_names: list[str],
                 output_names: list[str], vae_scale_factor: int, device_id: int = 0,
                 refit: ComponentRefit | None = None):
        """`refit`: how LoRA variants are written into this component's engines (None: no LoRAs)."""
        import cupy
        import tensorrt as trt

        self.name = name
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.vae_scale_factor = vae_scale_factor
        self._cupy, self._trt = cupy, trt
        self._device = cupy.cuda.Device(device_id)
        with self._device:
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._lock = threading.Lock()
        self.refit = refit
        self._engines: dict[str | None, _Engine] = {}
        for entry in entries:
            self._engines[entry.size] = self._load(package / entry.file, entry)

    def _load(self, path: Path, entry: EngineEntry) -> _Engine:
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise PackageError(f"TensorRT cannot load {path} (see its log); rebuild the engines")
        context = engine.create_execution_context()
        first = self.input_names[0]
        max_rows = entry.profile[first]["max"][0]
        log.info("loaded %s engine %s (%.0f MiB)", self.name, path.name, path.stat().st_size / 2**20)
        weights = self.refit.attach(engine, f"{self.name} {entry.size or 'engine'}") if self.refit else None
        return _Engine(entry, engine, context, max_rows, weights=weights)

    def _engine_for(self, feeds: dict[str, np.ndarray]) -> _Engine:
        if None in self._engines:
            return self._engines[None]
        first = feeds[self.input_names[0]]  # (B, C, h, w) latents, or (B, 3, H, W) pixels for the encoder
        scale = 1 if self.name == "vae_encoder" else self.vae_scale_factor
        size = f"{first.shape[3] * scale}x{first.shape[2] * scale}"
        engine = self._engines.get(size)
        if engine is None:  # the pipeline checks sizes first; this is the backstop
            raise EngineError(f"{self.name}: no TensorRT engine for {size}; built: {', '.join(map(str, self._engines))}")
        return engine

    def run(
        self, feeds: dict[str, np.ndarray], fixed_dims: dict[str, int] | None = None, variant: Variant = ()
    ) -> list[np.ndarray]:
        """Outputs in `output_names` order, computed with `variant`'s LoRA weights (() = the base)."""
        with self._lock, self._device:
            engine = self._engine_for(feeds)
            self._switch(engine, variant)
            rows = feeds[self.input_names[0]].shape[0]
            if rows <= engine.max_rows:
                return self._infer(engine, feeds, whole=True)
            parts = [
                self._infer(engine, {k: v[i : i + engine.max_rows] for k, v in feeds.items()}, whole=False)
                for i in range(0, rows, engine.max_rows)
            ]
            return [np.concatenate(outs) for outs in zip(*parts)]

    def _switch(self, engine: _Engine, variant: Variant) -> None:
        """Refit `engine` to `variant` if it holds another (engine/tensorrt/refit.py)."""
        if engine.weights is not None:
            self.refit.switch(engine.weights, variant)
        elif variant:  # the pipeline serves no LoRA then; this is the backstop
            raise EngineError(f"{self.name}: its TensorRT engines were built without refit, so they cannot apply LoRAs")

    def _infer(self, engine: _Engine, feeds: dict[str, np.ndarray], whole: bool) -> list[np.ndarray]:
        cp, ctx = self._cupy, engine.context
        keep = []  # device arrays must outlive the launch
        with self._stream:
            for name in self.input_names:
                host = feeds[name]
                device = self._upload(engine, name, host, cache=whole)
                keep.append(device)
                ctx.set_input_shape(name, tuple(host.shape))
                ctx.set_tensor_address(name, int(device.data.ptr))
            outputs = []
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                out = cp.empty(shape, dtype=self._trt.nptype(engine.engine.get_tensor_dtype(name)))
                ctx.set_tensor_address(name, int(out.data.ptr))
                outputs.append(out)
            if not ctx.execute_async_v3(self._stream.ptr):
                raise EngineError(f"{self.name}: TensorRT execution failed (see its log)")
            results = [out.get(stream=self._stream) for out in outputs]
        self._stream.synchronize()
        return results

    def _upload(self, engine: _Engine, name: str, host: np.ndarray, cache: bool):
        """The device copy of `host`; the previous one if it is the same read-only array."""
        held = engine.resident.get(name)
        if cache and held is not None and held[0] is host and not host.flags.writeable:
            return held[1]
        device = self._cupy.asarray(np.ascontiguousarray(host))
        if cache:
            engine.resident[name] = (host, device)
        return device
