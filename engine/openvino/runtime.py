"""One package component compiled by OpenVINO's CPU plugin, with ComponentSessions' `run`.

One compiled model per component serves every resolution and batch (dynamic shapes): OpenVINO
caches kernels per input shape itself, so unlike onnxruntime there is nothing to specialise per
size and the weights are held once. That cache grows with every new shape; it is bounded by
`CPU_RUNTIME_CACHE_CAPACITY` (RuntimeOptions.openvino_cache_entries, engine/openvino/pipeline.py). The IR's fp16 weights are mapped from model.bin and
converted once, at compile, to what the kernels read (bf16 or fp32 in blocked layouts).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from engine.errors import EngineError, PackageError

log = logging.getLogger(__name__)


class OpenVINOComponent:
    def __init__(self, core, path: Path, name: str, output_names: list[str], config: dict):
        self.name = name
        self.path = path
        self.output_names = list(output_names)
        if not path.is_file():
            raise PackageError(f"{path} is missing from the package; re-export it")
        try:
            model = core.read_model(str(path))
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:  # OpenVINO reports unreadable or truncated IR as RuntimeError
            raise PackageError(f"OpenVINO cannot load {path}: {e}") from None
        self._outputs = [self.compiled.output(n) for n in self.output_names]
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # one infer request: calls on a component take turns
        self.shapes_seen: set[tuple] = set()

    def run(self, feeds: dict[str, np.ndarray], fixed_dims: dict[str, int] | None = None) -> list[np.ndarray]:
        """Outputs in `output_names` order, as arrays the caller owns. `fixed_dims` is unused:
        the compiled model takes any shape."""
        with self._lock:
            try:
                results = self._request.infer(feeds)  # copies the outputs out of the request
            except RuntimeError as e:
                raise EngineError(f"OpenVINO failed running {self.name}: {e}") from None
            self.shapes_seen.add(tuple(sorted((k, v.shape) for k, v in feeds.items())))
            return [results[o] for o in self._outputs]

    @property
    def loaded_shapes(self) -> list[tuple]:
        return sorted(self.shapes_seen)
