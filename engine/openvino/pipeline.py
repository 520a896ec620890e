"""The pipeline for `openvino` packages: every component compiled by OpenVINO's CPU plugin.

Refusals happen at load: without the `openvino` package (naming what to install), or when
bf16 is asked for on a CPU without native bf16. Everything above the components — tokenizer,
samplers, guidance, step-level batching — is the onnxruntime pipeline's, unchanged.
"""

from __future__ import annotations

import logging

from engine.errors import IncompatiblePackageError
from engine.openvino.runtime import OpenVINOComponent
from engine.pipeline import Pipeline

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "f32")


class OpenVINOPipeline(Pipeline):
    serves_loras = False  # LoRA variants are built for onnxruntime CPU sessions only (engine/sessions.py)

    def _providers(self) -> list[str]:
        try:
            import openvino as ov
        except ImportError:
            raise IncompatiblePackageError(
                f"{self.package} is an OpenVINO package, which needs the openvino package "
                f"(`pip install 'kiln[openvino]'`); or export the model with --target cpu"
            ) from None

        wanted = self.options.openvino_precision
        if wanted not in PRECISIONS:
            raise IncompatiblePackageError(
                f"openvino precision must be one of {', '.join(PRECISIONS)}, not {wanted!r} (KILN_OPENVINO_PRECISION)"
            )
        self.core = ov.Core()
        capabilities = self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if wanted == "bf16" and "BF16" not in capabilities:
            raise IncompatiblePackageError(
                f"bf16 was asked for, but this CPU ({self.core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no native "
                f"bf16 (AVX512-BF16 or AMX); use precision auto or f32"
            )
        # The kernel cache per shape is bounded (RuntimeOptions.openvino_cache_entries): one
        # compiled model takes every size, and the sizes are the client's choice.
        self.ov_config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "CPU_RUNTIME_CACHE_CAPACITY": int(self.options.openvino_cache_entries),
        }
        if self.options.threads:
            self.ov_config["INFERENCE_NUM_THREADS"] = self.options.threads
        if wanted != "auto":
            self.ov_config["INFERENCE_PRECISION_HINT"] = wanted
        self.runtime_version = ov.__version__.split("-")[0]
        return []  # no onnxruntime providers: nothing here runs on onnxruntime

    def _component(self, name: str) -> OpenVINOComponent:
        component = self.manifest.components[name]
        loaded = OpenVINOComponent(
            self.core, self.package / component.file, name, [t.name for t in component.outputs], self.ov_config
        )
        self.precision = str(loaded.compiled.get_property("INFERENCE_PRECISION_HINT"))
        log.debug("%s compiled by OpenVINO %s, inference precision %s", name, self.runtime_version, self.precision)
        return loaded
