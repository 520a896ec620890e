"""What each export target adds on top of the portable fp32 ONNX graphs.

`cpu` keeps fp32 graphs: onnxruntime applies its CPU graph optimisations when the engine creates
sessions with each resolution's fixed shapes, which is where the CPU speed comes from.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from engine.errors import PackageError
from engine.manifest import Component

REQUIRED = {
    "cpu": ("onnxruntime",),
    "cuda": ("onnxruntime",),
    "tensorrt": ("tensorrt",),
}
NOT_YET = {
    "cuda": "the fp16 CUDA target is not implemented in this version of Kiln; export TARGET=cpu",
    "tensorrt": "the TensorRT target is not implemented in this version of Kiln; export TARGET=cpu",
}


def check_target_tools(target: str) -> None:
    """Fail before any work if the target's tools are not installed, naming what to install."""
    missing = [m for m in REQUIRED[target] if importlib.util.find_spec(m) is None]
    if missing:
        raise PackageError(
            f"TARGET={target} needs {', '.join(missing)}, which is not installed "
            f"(pip install {' '.join(missing)})"
        )
    if target in NOT_YET:
        raise PackageError(NOT_YET[target])


def optimise_for_target(target: str, folder: Path, components: dict[str, Component], info) -> tuple[dict[str, Component], str]:
    """Returns the (possibly rewritten) components and the package precision."""
    if target == "cpu":
        return components, "fp32"
    raise PackageError(NOT_YET.get(target, f"unknown target {target!r}"))
