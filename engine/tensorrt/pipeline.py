"""The pipeline for `tensorrt` packages: every component as TensorRT engines, no onnxruntime.

NOT YET RUN ON A GPU (see engine/tensorrt/__init__.py). Refusals happen at load, before any
engine is read: without `tensorrt` or CuPy (naming what to install), without a GPU, or with
engines built for another GPU or TensorRT version or stale against the package's ONNX (with the
command that rebuilds them). A request for a size without engines is refused at `resolve`,
listing the sizes built.
"""

from __future__ import annotations

import importlib.util

from engine.cuda.pipeline import ResidentConditioning
from engine.errors import IncompatiblePackageError
from engine.request import ImageRequest
from engine.tensorrt.cache import check_compatible, check_engine_size, gpu_identity, read_section

INSTALL = {
    "tensorrt": "tensorrt (NVIDIA TensorRT 10, e.g. `pip install tensorrt-cu12`)",
    "cupy": "cupy (e.g. `pip install cupy-cuda12x`)",
}


class TensorRTPipeline(ResidentConditioning):
    serves_loras = False  # LoRA variants are built for onnxruntime CPU sessions only (engine/sessions.py)

    def _providers(self) -> list[str]:
        missing = [m for m in INSTALL if importlib.util.find_spec(m) is None]
        if missing:
            raise IncompatiblePackageError(
                f"{self.package} holds TensorRT engines, which need {' and '.join(INSTALL[m] for m in missing)} "
                f"and an NVIDIA GPU; or export the model with --target cuda or cpu"
            )
        import tensorrt as trt

        self.section = read_section(self.manifest, self.package)
        gpu = gpu_identity(self.options.gpu.device_id)
        check_compatible(self.manifest, self.section, self.package, gpu, trt.__version__)
        return []  # no onnxruntime providers: nothing here runs on onnxruntime

    def _component(self, name: str):
        from engine.tensorrt.runtime import TensorRTComponent

        component = self.manifest.components[name]
        entries = [e for e in self.section.engines if e.component == name]
        return TensorRTComponent(
            self.package, name, entries, [t.name for t in component.inputs], [t.name for t in component.outputs],
            self.manifest.vae_scale_factor, self.options.gpu.device_id,
        )

    def resolve(self, req: ImageRequest) -> ImageRequest:
        req = super().resolve(req)
        check_engine_size(self.section, req.width, req.height)
        return req
