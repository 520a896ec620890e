"""TARGET=cuda packages: made here (graph surgery only), refused at load on a machine without CUDA.

The fused fp16 graphs hold CUDA-only operators, so their images can only be checked on a GPU
(benchmarks/gpu_check.py). What is checked here: the package and its manifest, that the fusions
happened and keep the package's float32 interface, that the timestep embedding stays fp32, the
SDXL VAE stays fp32, and — with the CPU-runnable subset of the same fusions — that the fused
attention computes what the unfused graph does (the numpy 2.4 head-count workaround included).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engine.errors import IncompatiblePackageError, PackageError
from engine.manifest import read_manifest
from engine.pipeline import Pipeline
from export.cuda_fp16 import optimise_graph
from export.targets import check_target_tools

NO_CUDA = "CUDAExecutionProvider" not in ort.get_available_providers()


@pytest.fixture(scope="module")
def cuda_package(tiny_target_package):
    return lambda family: tiny_target_package(family, "cuda")


def _weight_dtypes(package, component: str) -> set[str]:
    index = json.loads((package / component / "weights.json").read_text())
    return {entry["dtype"] for entry in index.values()}


def test_cuda_package_is_fp16_with_a_float32_interface(cuda_package):
    package = cuda_package("sd1")
    manifest = read_manifest(package)
    assert (manifest.target, manifest.precision) == ("cuda", "fp16")
    assert manifest.extra["cuda"]["component_precision"] == {
        "text_encoder": "fp16", "unet": "fp16", "vae_encoder": "fp16", "vae_decoder": "fp16"}
    assert {t.dtype for t in manifest.components["vae_encoder"].inputs + manifest.components["vae_encoder"].outputs} == {"float32"}
    assert {t.dtype for t in manifest.components["unet"].inputs} == {"float32"}
    assert {t.dtype for t in manifest.components["unet"].outputs} == {"float32"}
    assert _weight_dtypes(package, "unet") == {"float16"}


def test_cuda_package_holds_the_sd_fusions(cuda_package):
    fused = read_manifest(cuda_package("sd1")).extra["cuda"]["fused_operators"]
    assert {"MultiHeadAttention", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv"} <= set(fused["unet"])
    assert "GroupNorm" in fused["vae_decoder"] and "GroupNorm" in fused["vae_encoder"]


def test_timestep_embedding_stays_fp32(cuda_package):
    """No cast to fp16 between the timestep input and its sine: fp16 resolves t=999 to 0.5."""
    graph = onnx.load(str(cuda_package("sd1") / "unet" / "model.onnx"), load_external_data=False).graph
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    path, frontier = [], ["timestep"]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Gemm", "MatMul"):
                continue
            path.append(node)
            frontier.extend(node.output)
    sines = [n for n in path if n.op_type == "Sin"]
    assert sines
    casts_before_sin = [n for n in path[: path.index(sines[0])] if n.op_type == "Cast"]
    assert all(a.i != onnx.TensorProto.FLOAT16 for n in casts_before_sin for a in n.attribute if a.name == "to")


def test_sdxl_vae_stays_fp32(cuda_package):
    package = cuda_package("sdxl")
    precision = read_manifest(package).extra["cuda"]["component_precision"]
    assert precision["vae_decoder"] == precision["vae_encoder"] == "fp32" and precision["unet"] == "fp16"
    assert _weight_dtypes(package, "vae_decoder") == _weight_dtypes(package, "vae_encoder") == {"float32"}


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the package would load")
def test_cuda_package_is_refused_here_with_the_reason(cuda_package):
    with pytest.raises(IncompatiblePackageError, match="CUDAExecutionProvider.*install onnxruntime-gpu"):
        Pipeline(cuda_package("sd1"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_fused_attention_computes_what_the_plain_graph_does(tiny_package, tmp_path, family):
    """The CPU-runnable fusions (MultiHeadAttention, LayerNorm) with heads read by the patch."""
    source = tiny_package(family) / "unet"
    shutil.copytree(source, tmp_path / "unet")
    fused = optimise_graph(tmp_path / "unet" / "model.onnx", "unet", fp16=False, gpu=False)
    assert fused.get("MultiHeadAttention", 0) + fused.get("Attention", 0) > 0
    plain = ort.InferenceSession(str(source / "model.onnx"))
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in plain.get_inputs():
        shape = [{"batch_size": 2, "height": 16, "width": 16, "sequence_length": 77}.get(d, d) for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(np.float32)
    feeds["timestep"] = np.array([999.0, 21.0], np.float32)
    want = plain.run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "unet" / "model.onnx")).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_tensorrt_sizes_are_refused_for_other_targets():
    from export.targets import TargetOptions

    with pytest.raises(PackageError, match="SIZES and BATCH are TARGET=tensorrt options"):
        check_target_tools("cuda", TargetOptions(sizes=("512x512",)))


def test_a_cuda_package_derived_from_a_cpu_package_equals_the_exported_one(tiny_package, cuda_package, tmp_path):
    from export.cuda_fp16 import derive_cuda_package

    derived = read_manifest(derive_cuda_package(tiny_package("sd1"), tmp_path / "cuda"))
    exported = read_manifest(cuda_package("sd1"))
    assert (derived.target, derived.precision) == ("cuda", "fp16")
    assert {n: c.sha256 for n, c in derived.components.items()} == {n: c.sha256 for n, c in exported.components.items()}
    assert derived.extra["cuda"]["fused_operators"] == exported.extra["cuda"]["fused_operators"]
