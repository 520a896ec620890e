"""What each export target adds on top of the portable fp32 ONNX graphs.

`cpu` keeps fp32 graphs: onnxruntime applies its CPU graph optimisations when the engine creates
sessions with each resolution's fixed shapes, which is where the CPU speed comes from.

`cuda` rewrites every graph with onnxruntime's Stable Diffusion optimiser and converts it to fp16
(export/cuda_fp16.py). That is graph surgery only: it runs on any machine, and the package then
runs on onnxruntime's CUDA execution provider (engine/cuda/).

`tensorrt` keeps the fp32 ONNX graphs (so engines can be rebuilt from the package alone) and
builds TensorRT engines per resolution from them (export/tensorrt_engines.py). TensorRT builds for
the GPU it runs on, so this target needs the `tensorrt` package and an NVIDIA GPU at export time.

`openvino` converts the fp32 ONNX graphs to OpenVINO IR with fp16 weights (export/openvino_ir.py)
for OpenVINO's CPU plugin (engine/openvino/): the fast CPU target, bf16 where the CPU has it.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import PackageError
from engine.manifest import Component, Manifest

log = logging.getLogger(__name__)

# Python module -> what to install for it.
INSTALL = {
    "onnxruntime": "onnxruntime (or onnxruntime-gpu)",
    "onnx": "onnx",
    "sympy": "sympy (onnxruntime's symbolic shape inference, used by the fp16 conversion)",
    "tensorrt": "tensorrt (NVIDIA TensorRT 10 for your CUDA version, e.g. `pip install tensorrt-cu12`)",
    "openvino": "openvino (`pip install 'kiln[openvino]'`)",
}
REQUIRED = {
    "cpu": ("onnxruntime",),
    "cuda": ("onnxruntime", "onnx", "sympy"),
    "tensorrt": ("tensorrt", "onnx"),
    "openvino": ("openvino",),
}


@dataclass(frozen=True)
class TargetOptions:
    """Export options that only some targets take (TARGET=tensorrt SIZES=... BATCH=...)."""

    sizes: tuple[str, ...] = ()  # "WxH"; TensorRT builds one engine per size
    batches: tuple[int, ...] = ()  # images per request batch the engines must take

    def recorded(self) -> dict:
        """What the manifest keeps so that a re-export with other options is not reused."""
        return {k: list(v) for k, v in (("sizes", self.sizes), ("batches", self.batches)) if v}


@dataclass(frozen=True)
class TargetResult:
    components: dict[str, Component]
    precision: str  # fp32 | fp16 (the UNet's; per-component precisions are in extra)
    extra: dict = field(default_factory=dict)  # goes into the manifest's `extra`


def check_target_tools(target: str, options: TargetOptions | None = None) -> None:
    """Fail before any work if the target's tools are not installed, naming what to install."""
    options = options or TargetOptions()
    if (options.sizes or options.batches) and target != "tensorrt":
        raise PackageError(f"SIZES and BATCH are TARGET=tensorrt options; TARGET={target} takes every size")
    missing = [m for m in REQUIRED[target] if importlib.util.find_spec(m) is None]
    if missing:
        raise PackageError(
            f"TARGET={target} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"install {'; '.join(INSTALL[m] for m in missing)}"
        )
    if target == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            # Not an error: the fp16 graphs are made on any machine. Say where they will run.
            log.warning(
                "this machine has no CUDAExecutionProvider: the cuda package will be made here, but runs only "
                "where onnxruntime-gpu and an NVIDIA GPU are (pip install onnxruntime-gpu)"
            )
    if target == "tensorrt":
        from export.tensorrt_engines import check_builder

        check_builder()  # raises naming the missing GPU/driver


def optimise_for_target(
    target: str, folder: Path, components: dict[str, Component], info, options: TargetOptions | None = None
) -> TargetResult:
    """The (possibly rewritten) components, the package precision and manifest extras."""
    options = options or TargetOptions()
    if target == "cpu":
        return TargetResult(components, "fp32")
    if target == "cuda":
        import onnxruntime as ort

        from export.cuda_fp16 import optimise_package

        components, details = optimise_package(folder, components, info.family)
        details.update(optimizer=f"onnxruntime.transformers {ort.__version__}", io_dtype="float32")
        return TargetResult(components, "fp16", {"cuda": details})
    if target == "tensorrt":
        return TargetResult(components, "fp16")  # the engines are built from the finished package
    if target == "openvino":
        from export.openvino_ir import convert_package

        components, details = convert_package(folder, components)
        return TargetResult(components, "fp16", {"openvino": details})
    raise PackageError(f"unknown target {target!r}")


def finish_for_target(target: str, folder: Path, manifest: Manifest, options: TargetOptions | None = None) -> Manifest:
    """After the manifest is made: TensorRT engines per size, described in the manifest."""
    if target != "tensorrt":
        return manifest
    from export.tensorrt_engines import build_engines

    options = options or TargetOptions()
    # Assembled in <target>.partial: engines of the package it replaces are reused by key.
    previous = folder.with_name(folder.name.removesuffix(".partial"))
    return build_engines(folder, manifest, options.sizes, options.batches, reuse_from=previous if previous != folder else None)
