"""LoRAs on the CUDA runtime, as far as they run without a GPU.

`BoundPipeline` serves a cpu package's LoRA variants through the binding code `CudaPipeline` uses
(variant sessions without CUDA graphs, bindings forgotten with their session); the variant LRU is
engine/cuda/variants.py; a cuda package (derived from the tiny SD 1 cpu package) keeps its
LoRA-adaptable weights under their torch parameter names, so a LoRA matches it and
`kiln lora add` takes it. What only a GPU shows (images within fp16 tolerance of the cpu
package's, GPU memory per variant session) is in README "LoRAs on GPUs".
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engine.cuda.binding import BoundComponent
from engine.cuda.pipeline import BoundPipeline
from engine.cuda.variants import DISABLED_OPTIMIZERS, VariantSessions
from engine.lora import add_lora, match_lora
from engine.pipeline import Pipeline
from engine.request import ImageRequest, LoraChoice
from engine.sessions import RuntimeOptions

torch = pytest.importorskip("torch")

from tests.test_lora_files import _random_pairs, write_kohya  # noqa: E402

OPTIONS = RuntimeOptions(threads=1)
REQUEST = dict(prompt="a red cube", width=64, height=64, seed=7, steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_checkpoint):
    """A random kohya LoRA over the tiny SD 1.x UNet and text encoder (scaled to show in 3 steps)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    pairs = [(c, n, d * 4, u * 4, a) for c, n, d, u, a in _random_pairs(pipe, seed=11)]
    return write_kohya(pairs, tmp_path_factory.mktemp("loras") / "style.safetensors", "sd1")


@pytest.fixture(scope="module")
def lora_package(tmp_path_factory, tiny_package, lora_file):
    package = tmp_path_factory.mktemp("pkg") / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    add_lora(package, lora_file, "style")
    return package


@pytest.fixture(scope="module")
def plain(lora_package):
    return Pipeline(lora_package, OPTIONS)


@pytest.fixture(scope="module")
def cuda_package(tmp_path_factory, tiny_package):
    """Derived from the cpu package with the current export code (not the export cache)."""
    from export.cuda_fp16 import derive_cuda_package

    return derive_cuda_package(tiny_package("sd1"), tmp_path_factory.mktemp("derived") / "cuda")


def _request(scale: float | None = 1.0, **changes) -> ImageRequest:
    loras = () if scale is None else (LoraChoice(name="style", scale=scale),)
    return ImageRequest(**{**REQUEST, "loras": loras, **changes})


# ---- BoundPipeline: the binding code with LoRA variants, on the CPU execution provider -------


def test_bound_pipeline_with_a_lora_makes_the_plain_pipelines_image(lora_package, plain):
    want = plain.generate([_request()])[0]
    got = BoundPipeline(lora_package, OPTIONS).generate([_request()])[0]
    assert np.abs(want.astype(int) - plain.generate([_request(None)])[0]).mean() > 2, "the LoRA changed nothing"
    np.testing.assert_array_equal(got, want)


def test_scale_zero_is_the_base_image(lora_package, plain):
    np.testing.assert_array_equal(BoundPipeline(lora_package, OPTIONS).generate([_request(0.0)])[0], plain.generate([_request(None)])[0])


def test_two_variants_interleaved_on_one_size_are_each_right(lora_package, plain):
    reqs = [_request(1.0, seed=1), _request(0.5, seed=2)]
    expected = [plain.generate([r])[0] for r in reqs]
    pipe = BoundPipeline(lora_package, OPTIONS)
    a, b = pipe.prepare(reqs[:1]), pipe.prepare(reqs[1:])
    while not (a[0].done and b[0].done):  # as the scheduler does with two batches of one size
        pipe.denoise_step(a) if not a[0].done else None
        pipe.denoise_step(b) if not b[0].done else None
    for got, want in zip([pipe.decode(a)[0], pipe.decode(b)[0]], expected):
        np.testing.assert_array_equal(got, want)


# ---- the variant LRU and the binding's bookkeeping -------------------------------------------


def test_the_least_recently_used_variant_is_dropped_and_forgotten():
    dropped = []
    built = []

    def build(variant):
        built.append(variant)
        return object()

    lru = VariantSessions("unet", build, max_variants=2, on_drop=dropped.append)
    a, b, c = (("a", 1.0),), (("b", 1.0),), (("c", 1.0),)
    first = lru.session(a)
    lru.session(b)
    assert lru.session(a) is first  # kept, and now the most recently used
    lru.session(c)
    assert lru.variants == [a, c]
    assert dropped and dropped[0] is not first and lru.evictions == 1
    lru.session(b)  # built again after being dropped
    assert built == [a, b, c, b] and len(dropped) == 2 and dropped[1] is first


def _add_model(path, weight: float) -> ort.InferenceSession:
    """y = x + w, w an initializer: stands in for a base or variant session."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [2], [weight, weight])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_variant_sessions_get_no_cuda_graph_and_are_forgotten_when_dropped(tmp_path):
    base = _add_model(tmp_path / "base.onnx", 0.0)
    variants = VariantSessions("add", lambda v: _add_model(tmp_path / f"{v[0][0]}.onnx", v[0][1]), max_variants=1)
    bound = BoundComponent("add", lambda _dims, variant=(): variants.session(variant) if variant else base,
                           ["x"], ["y"], device="cpu", graph_slots=4)
    variants.on_drop = bound.forget
    x = np.ones(2, np.float32)
    assert bound.run({"x": x})[0].tolist() == [1.0, 1.0]
    assert bound.run({"x": x}, None, (("one", 1.0),))[0].tolist() == [2.0, 2.0]
    assert len(bound.graph_keys) == 1  # the base's key only
    assert bound.run({"x": x}, None, (("two", 2.0),))[0].tolist() == [3.0, 3.0]
    assert len(bound.loaded_shapes) == 2  # the base's and "two"'s: "one"'s binding went with its session
    assert bound.run({"x": x})[0].tolist() == [1.0, 1.0]


# ---- the cuda package's weights ---------------------------------------------------------------


def test_a_cuda_package_names_every_weight_a_lora_adapts(cuda_package, tiny_package, lora_file):
    for component in ("unet", "text_encoder"):
        cpu = json.loads((tiny_package("sd1") / component / "weights.json").read_text())
        cuda = json.loads((cuda_package / component / "weights.json").read_text())
        assert {n: e.get("param") for n, e in cpu.items() if n.startswith(("onnx::", "conv", "down", "up", "mid"))
                and "bias" not in n} == {n: cuda[n].get("param") for n, e in cpu.items() if n in cuda
                and n.startswith(("onnx::", "conv", "down", "up", "mid")) and "bias" not in n}
        assert {cuda[n]["dtype"] for n in cpu if n in cuda and cpu[n]["dtype"] == "float32"} == {"float16"}
    matched = match_lora(cuda_package, lora_file)  # raises on any key that matches no weight
    assert matched.components == ["text_encoder", "unet"]


def test_kiln_lora_add_takes_a_cuda_package(cuda_package, lora_file, tmp_path):
    package = tmp_path / "cuda"
    shutil.copytree(cuda_package, package)
    entry = add_lora(package, lora_file, "style")
    assert entry.components == ["text_encoder", "unet"] and (package / entry.file).is_file()


def test_a_weight_given_to_the_fused_graph_reaches_its_fused_attention(tiny_package, tmp_path):
    """The CPU-runnable fusions: a to_q weight given by add_initializer (as a LoRA variant's is)
    changes the fused graph's output as it changes the cpu package's, with constant folding off
    as variant sessions have it (with it on, the override is silently dropped)."""
    from export.cuda_fp16 import optimise_graph

    source = tiny_package("sd1") / "unet"
    shutil.copytree(source, tmp_path / "unet")
    fused_path = tmp_path / "unet" / "model.onnx"
    optimise_graph(fused_path, "unet", fp16=False, gpu=False)
    concat = next(n for n in onnx.load(str(fused_path), load_external_data=False).graph.node if n.name.endswith("_from_qkv"))
    name = concat.input[0]  # a to_q weight, under its cpu-package name
    index = json.loads((source / "weights.json").read_text())[name]
    blob = np.fromfile(source / "weights.bin", dtype=np.uint8)[index["offset"] : index["offset"] + index["length"]]
    weight = blob.view(np.float32).reshape(index["shape"]) + 0.5 * np.random.default_rng(0).standard_normal(index["shape"]).astype(np.float32)
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8)).astype(np.float32), "timestep": np.array([999.0, 21.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32)).astype(np.float32)}

    value = ort.OrtValue.ortvalue_from_numpy(weight)  # onnxruntime reads it for the session's life

    def run(path, changed: bool, disabled=DISABLED_OPTIMIZERS):
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        if changed:
            so.add_initializer(name, value)
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        return session.run(None, feeds)[0]

    want = run(source / "model.onnx", True)
    base = run(fused_path, False, None)
    assert not np.allclose(want, base, atol=1e-3)
    np.testing.assert_allclose(run(fused_path, True), want, atol=1e-4 * np.abs(want).max())
