"""TARGET=openvino: every component as an OpenVINO IR with fp16 weights, for Intel/AMD CPUs.

Why a second CPU target: on this project's 2-core AMD EPYC (AVX-512 with BF16), onnxruntime's
CPU provider and PyTorch spend the same time in convolutions (fp32 kernels of equal speed), so
no onnxruntime setting gets the engine far below PyTorch. OpenVINO's CPU plugin runs the same
graphs with fused, layout-blocked kernels and, on CPUs with native bf16 (AVX512-BF16, AMX), in
bf16: see benchmarks/results/engine_vs_diffusers_sd15-architecture_256x256.json for what that buys.

The IR keeps the weights in fp16, half the size of fp32 on disk and in the page cache; OpenVINO
converts them once, at load, to the precision and layout its kernels compute in (bf16 or fp32). The engine (engine/openvino/) maps model.bin and
compiles one model per component with dynamic shapes: every resolution and batch shares one
copy of the weights, with no session per size.

`derive_openvino_package` makes the package from an exported cpu package's ONNX graphs without
exporting from PyTorch again (`python -m export.openvino_ir build/<name>/cpu`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.manifest import Component

log = logging.getLogger(__name__)

IR_XML = "model.xml"
IR_BIN = "model.bin"


def convert_component(folder: Path, component: Component) -> Component:
    """Replace one component's ONNX graph (and weights.bin) in `folder` with an fp16-weight IR."""
    import openvino as ov

    from export.package import sha256_file

    onnx_path = folder / component.file
    component_dir = onnx_path.parent
    xml = component_dir / IR_XML
    model = ov.Core().read_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=True)
    del model  # releases the mapped ONNX weights before they are deleted
    for stale in component_dir.iterdir():
        if stale.name not in (IR_XML, IR_BIN):
            stale.unlink()
    return Component(
        file=f"{component_dir.name}/{IR_XML}",
        sha256=sha256_file(xml),
        inputs=component.inputs,  # the IR keeps the ONNX graph's input and output names
        outputs=component.outputs,
        weights_file=f"{component_dir.name}/{IR_BIN}",
    )


def convert_package(folder: Path, components: dict[str, Component]) -> tuple[dict[str, Component], dict]:
    """Convert every component of the package being assembled in `folder`, in place."""
    import openvino as ov

    out = {}
    for name, component in components.items():
        log.info("  %s: ONNX -> OpenVINO IR, fp16 weights", name)
        out[name] = convert_component(folder, component)
    return out, {"openvino": ov.__version__.split("-")[0], "weights": "fp16", "format": "IR"}


def derive_openvino_package(cpu_package: Path, out: Path | None = None, force: bool = False) -> Path:
    """An openvino package from a cpu package: what `kiln export --target openvino` makes, minus
    the PyTorch export (the same ONNX graphs go through the same conversion)."""
    from importlib import metadata

    from export.derive import derive_package

    tools = {"openvino": metadata.version("openvino")}
    return derive_package(cpu_package, "openvino", "fp16", convert_package, out, force, tools=tools)


def main(argv: list[str] | None = None) -> int:
    from export.derive import derive_main

    return derive_main(argv, "openvino", "IR, fp16 weights", derive_openvino_package)


if __name__ == "__main__":
    raise SystemExit(main())
