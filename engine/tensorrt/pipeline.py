"""The pipeline for `tensorrt` packages: every component as TensorRT engines, no onnxruntime.

NOT YET RUN ON A GPU (see engine/tensorrt/__init__.py). Refusals happen at load, before any
engine is read: without `tensorrt` or CuPy (naming what to install), without a GPU, or with
engines built for another GPU or TensorRT version or stale against the package's ONNX (with the
command that rebuilds them). A request for a size without engines is refused at `resolve`,
listing the sizes built.

LoRAs are served when the package's UNet and text-encoder engines were built refittable
(`python -m export.tensorrt_engines PACKAGE --refit`): each call switches its engine to the
call's LoRA variant by refitting the weights that differ (engine/tensorrt/refit.py). Otherwise
the package's LoRAs are not served, and the log says how to rebuild.
"""

from __future__ import annotations

import importlib.util
import logging

from engine.cuda.pipeline import ResidentConditioning
from engine.errors import IncompatiblePackageError
from engine.lora.variants import LoraLibrary
from engine.request import ImageRequest
from engine.tensorrt.cache import check_compatible, check_engine_size, gpu_identity, read_section
from engine.tensorrt.refit import REFIT_COMPONENTS, ComponentRefit, base_weights, refit_refusal

log = logging.getLogger(__name__)

INSTALL = {
    "tensorrt": "tensorrt (NVIDIA TensorRT 10, e.g. `pip install tensorrt-cu12`)",
    "cupy": "cupy (e.g. `pip install cupy-cuda12x`)",
}


class TensorRTPipeline(ResidentConditioning):
    serves_loras = False  # until `_providers` finds the engines LoRAs adapt refittable
    variant_switch_cost = True  # an engine switched to other LoRAs is refitted (engine/tensorrt/refit.py)

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
        self.lora_refusal = refit_refusal(self.section, self.package)
        self.serves_loras = self.lora_refusal is None
        return []  # no onnxruntime providers: nothing here runs on onnxruntime

    def _loras(self) -> LoraLibrary | None:
        if self.serves_loras:
            return super()._loras()
        names = LoraLibrary(self.package).names
        # Said even without stored LoRAs: whoever adds one later learns why it will not be served.
        log.log(logging.WARNING if names else logging.INFO, "%s: LoRAs%s are not served: %s", self.package,
                f" ({', '.join(names)})" if names else "", self.lora_refusal)
        return None

    def _component(self, name: str):
        from engine.tensorrt.runtime import TensorRTComponent

        component = self.manifest.components[name]
        entries = [e for e in self.section.engines if e.component == name]
        refit = None
        if self.loras is not None and self.loras.names and name in REFIT_COMPONENTS:
            import tensorrt as trt

            refit = ComponentRefit(trt, name, base_weights(self.package, component), self.loras)
        return TensorRTComponent(
            self.package, name, entries, [t.name for t in component.inputs], [t.name for t in component.outputs],
            self.manifest.vae_scale_factor, self.options.gpu.device_id, refit=refit,
        )

    def resolve(self, req: ImageRequest) -> ImageRequest:
        req = super().resolve(req)
        check_engine_size(self.section, req.width, req.height)
        return req
