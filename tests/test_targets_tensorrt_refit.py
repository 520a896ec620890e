"""LoRAs on TensorRT engines by refit: engines built refittable when asked, switched between LoRA
variants by writing exactly the weights that differ (the base's again on the way back), refused
with the reason when an engine cannot take them.

A fake `tensorrt` module stands in for the real one, which cannot run on this machine (no NVIDIA
GPU, no TensorRT): its engines hold their weights as numpy arrays and its Refitter records what
`set_named_weights` would write and when `refit_cuda_engine` is called. The weights and LoRAs are
the tiny SD 1.x package's own. That the real TensorRT names and refits the weights as the fake
does, and what a refit costs, is checked only on a GPU (engine/tensorrt/refit.py lists what).
"""

from __future__ import annotations

import contextlib
import enum
import importlib.machinery
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import msgspec
import numpy as np
import pytest

from engine.errors import EngineError, PackageError
from engine.lora import add_lora
from engine.lora.variants import LoraLibrary
from engine.manifest import read_manifest, write_manifest
from engine.request import ImageRequest, LoraChoice
from engine.sessions import RuntimeOptions
from engine.tensorrt.cache import GpuIdentity, TensorRTSection, check_compatible, engine_key
from engine.tensorrt.profiles import Profile
from engine.tensorrt.refit import ComponentRefit, base_weights, refit_refusal
from export import tensorrt_engines

torch = pytest.importorskip("torch")

from tests.test_lora_files import _random_pairs, write_kohya  # noqa: E402

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
TRT = "10.8.0.43"
A, B = (("a", 1.0),), (("b", 1.0),)  # variants: LoRA a (UNet and text encoder), LoRA b (UNet attn1 only)
REQUEST = dict(prompt="a red cube", width=64, height=64, seed=7, steps=2, guidance_scale=5.0)


# ---- a fake tensorrt: engines whose weights are numpy arrays --------------------------------


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"


class FakeEngine:
    """An ICudaEngine as far as refit goes: its weights by name, in its own dtype."""

    def __init__(self, weights, dtype=DataType.HALF, refittable=True, fixed=(), fused=(), onnx=None):
        self.refittable = refittable
        self.dtype = dtype
        self.weights = {name: np.array(a, dtype=dtype.value) for name, a in weights.items()}
        self.fixed = set(fixed)  # names get_all_weights leaves out
        self.fused = [set(group) for group in fused]  # weights TensorRT merged: set one, give them all
        self.refits: list[dict[str, np.ndarray]] = []  # what each refit_cuda_engine wrote
        self.fail_next = False
        self.onnx = onnx

    def create_execution_context(self):
        return object()


class Refitter:
    def __init__(self, engine: FakeEngine, logger):
        self.engine, self.pending = engine, {}

    def get_all_weights(self):
        return [name for name in self.engine.weights if name not in self.engine.fixed]

    def get_weights_prototype(self, name):
        return types.SimpleNamespace(dtype=self.engine.dtype, size=self.engine.weights[name].size)

    def set_named_weights(self, name, weights):
        if name not in self.get_all_weights() or weights.array.size != self.engine.weights[name].size:
            return False
        self.pending[name] = weights.array
        return True

    def get_missing_weights(self):
        merged = {n for group in self.engine.fused if group & self.pending.keys() for n in group}
        return sorted(merged - self.pending.keys())

    def refit_cuda_engine(self):
        if self.get_missing_weights() or self.engine.fail_next:
            self.engine.fail_next = False
            return False
        for name, array in self.pending.items():
            assert array.dtype == self.engine.weights[name].dtype, f"{name} handed as {array.dtype}"
            self.engine.weights[name] = array.reshape(self.engine.weights[name].shape).copy()
        self.engine.refits.append(dict(self.pending))
        return True


class Weights:
    def __init__(self, array: np.ndarray):
        self.array = array


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.Logger = type("Logger", (), {"WARNING": 2, "ERROR": 1, "__init__": lambda self, level=None: None})
    trt.DataType, trt.Refitter, trt.Weights = DataType, Refitter, Weights
    trt.nptype = lambda dtype: np.dtype(dtype.value).type
    trt.BuilderFlag = enum.Enum("BuilderFlag", "FP16 REFIT")
    trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
    return trt


# ---- a package with LoRAs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_package(tmp_path_factory, tiny_package, tiny_checkpoint):
    """A copy of the tiny SD 1.x cpu package with LoRA `a` (UNet and text encoder) and `b` (the
    UNet's attn1 modules only, so it changes a subset of a's weights)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint("sd1")))
    folder = tmp_path_factory.mktemp("refit-loras")
    pairs_a = [(c, n, d * 4, u * 4, alpha) for c, n, d, u, alpha in _random_pairs(pipe, seed=21)]
    pairs_b = [(c, n, d * 4, u * 4, alpha) for c, n, d, u, alpha in _random_pairs(pipe, seed=22)
               if c == "unet" and "attn1" in n]
    package = folder / "sd1"
    shutil.copytree(tiny_package("sd1"), package)
    add_lora(package, write_kohya(pairs_a, folder / "a.safetensors", "sd1"), "a")
    add_lora(package, write_kohya(pairs_b, folder / "b.safetensors", "sd1"), "b")
    return package


def _refit(package: Path, component: str = "unet", **engine_options):
    """A ComponentRefit over the package's weights and one fake engine built from them."""
    base = base_weights(package, read_manifest(package).components[component])
    refit = ComponentRefit(fake_tensorrt(), component, base, LoraLibrary(package))
    engine = FakeEngine({**base, **engine_options.pop("extra", {})}, **engine_options)
    return refit, engine, refit.attach(engine, f"{component} 64x64")


def _expected(package: Path, variant, component: str = "unet") -> dict[str, np.ndarray]:
    base = base_weights(package, read_manifest(package).components[component])
    return LoraLibrary(package).changed_weights(component, variant, base)


# ---- switching variants -------------------------------------------------------------------


def test_switching_variants_refits_exactly_the_weights_that_differ(lora_package):
    refit, engine, held = _refit(lora_package)
    built = {name: array.copy() for name, array in engine.weights.items()}
    changed_a, changed_b = _expected(lora_package, A), _expected(lora_package, B)
    assert set(changed_b) < set(changed_a), "the test LoRAs: b changes a subset of a's weights"

    refit.switch(held, A)  # base -> a: a's weights, base + delta, in the engine's dtype
    assert set(engine.refits[-1]) == set(changed_a)
    for name, array in engine.refits[-1].items():
        assert array.dtype == np.float16
        np.testing.assert_array_equal(array, changed_a[name].astype(np.float16))
        assert not np.array_equal(array, built[name]), f"{name}: a changes it"

    assert refit.switch(held, A) == 0 and len(engine.refits) == 1  # a -> a: nothing to write

    refit.switch(held, B)  # a -> b: b's weights at b's values, the rest of a's back to the base's
    assert set(engine.refits[-1]) == set(changed_a)
    for name, array in engine.refits[-1].items():
        expected = changed_b[name].astype(np.float16) if name in changed_b else built[name]
        np.testing.assert_array_equal(array, expected)

    refit.switch(held, ())  # b -> base: b's weights only, restored bit for bit
    assert set(engine.refits[-1]) == set(changed_b)
    assert len(engine.refits) == 3
    for name, array in engine.weights.items():
        np.testing.assert_array_equal(array, built[name])
    assert refit.cached_variants == [()], "a variant's weights are kept only while an engine holds it"


def test_weights_two_variants_give_the_same_value_are_not_written_again(lora_package):
    refit, engine, held = _refit(lora_package)
    changed_a, changed_b = _expected(lora_package, A), _expected(lora_package, B)
    both = (("a", 1.0), ("b", 1.0))
    refit.switch(held, A)
    refit.switch(held, both)  # a's weights that b leaves alone already hold a + b's values
    assert set(engine.refits[-1]) == set(changed_b)
    for name, array in engine.refits[-1].items():
        np.testing.assert_array_equal(array, _expected(lora_package, both)[name].astype(np.float16))
    assert set(changed_a) - set(changed_b), "the test needs weights only a changes"


def test_each_engine_of_a_component_holds_its_own_variant(lora_package, monkeypatch):
    """A call switches the engine of its size before inferring; the other sizes' engines keep theirs."""
    from engine.tensorrt.runtime import TensorRTComponent, _Engine

    base = base_weights(lora_package, read_manifest(lora_package).components["unet"])
    refit = ComponentRefit(fake_tensorrt(), "unet", base, LoraLibrary(lora_package))
    unet = object.__new__(TensorRTComponent)  # __init__ needs cupy and a GPU
    unet.name, unet.input_names, unet.output_names, unet.vae_scale_factor = "unet", ["x"], ["y"], 8
    unet._lock, unet._device, unet.refit = threading.Lock(), contextlib.nullcontext(), refit
    unet._engines = {}
    for size in ("64x64", "128x128"):
        engine = FakeEngine(base)
        unet._engines[size] = _Engine(None, engine, None, max_rows=8, weights=refit.attach(engine, f"unet {size}"))
    ran = []

    def infer(engine, feeds, whole):
        ran.append((engine.weights.label, engine.weights.variant))  # what the engine held as it ran
        return [feeds["x"]]

    monkeypatch.setattr(unet, "_infer", infer)
    small, large = np.zeros((2, 4, 8, 8), np.float32), np.zeros((2, 4, 16, 16), np.float32)
    unet.run({"x": small}, None, A)
    unet.run({"x": large})
    unet.run({"x": small}, None, A)
    assert refit.refits == 1 and A in refit.cached_variants
    unet.run({"x": large}, None, A)
    unet.run({"x": small})
    assert ran == [("unet 64x64", A), ("unet 128x128", ()), ("unet 64x64", A), ("unet 128x128", A), ("unet 64x64", ())]
    assert refit.refits == 3 and A in refit.cached_variants, "the 128x128 engine still holds a"


# ---- refusals -------------------------------------------------------------------------------


def test_an_engine_not_built_refittable_is_refused(lora_package):
    with pytest.raises(PackageError, match="records this TensorRT engine as refittable but TensorRT says it is not.*--refit"):
        _refit(lora_package, refittable=False)


def test_a_lora_call_on_engines_without_refit_is_refused(monkeypatch):
    from engine.tensorrt.runtime import TensorRTComponent, _Engine

    plain = object.__new__(TensorRTComponent)  # engines loaded without a ComponentRefit
    plain.name, plain.input_names, plain.output_names, plain.vae_scale_factor = "unet", ["x"], ["y"], 8
    plain._lock, plain._device, plain.refit = threading.Lock(), contextlib.nullcontext(), None
    plain._engines = {None: _Engine(None, object(), None, max_rows=8)}
    monkeypatch.setattr(plain, "_infer", lambda engine, feeds, whole: [feeds["x"]])
    plain.run({"x": np.zeros((1, 4, 8, 8), np.float32)})
    with pytest.raises(EngineError, match="unet: its TensorRT engines were built without refit, so they cannot apply LoRAs"):
        plain.run({"x": np.zeros((1, 4, 8, 8), np.float32)}, None, A)


def test_weights_the_engine_cannot_refit_are_named(lora_package):
    frozen = sorted(_expected(lora_package, B))[:2]
    refit, engine, held = _refit(lora_package, fixed=frozen)
    with pytest.raises(PackageError, match=re.escape(f"cannot refit 2 of the weights b:1 changes ({frozen[0]}, {frozen[1]})")):
        refit.switch(held, B)
    assert engine.refits == [] and held.variant == (), "nothing was written"


def test_weights_tensorrt_merged_with_a_changed_one_are_given_at_their_values(lora_package):
    changed = sorted(_expected(lora_package, B))
    partner = next(n for n in sorted(_expected(lora_package, A)) if n not in changed)
    refit, engine, held = _refit(lora_package, fused=[{changed[0], partner}])
    refit.switch(held, B)
    assert set(engine.refits[-1]) == set(changed) | {partner}
    np.testing.assert_array_equal(engine.refits[-1][partner], refit.base[partner].astype(np.float16))


def test_missing_weights_the_package_does_not_hold_are_reported(lora_package):
    changed = sorted(_expected(lora_package, B))
    small = np.zeros(4, np.float32)  # an initializer under 1 KiB stays inside model.onnx, not weights.bin
    refit, engine, held = _refit(lora_package, extra={"onnx::Mul_7": small}, fused=[{changed[0], "onnx::Mul_7"}])
    with pytest.raises(PackageError, match="also needs the weights onnx::Mul_7 to refit, which the package's weights.bin"):
        refit.switch(held, B)
    assert engine.refits == [] and held.variant == ()


def test_after_a_failed_refit_the_next_switch_writes_every_weight(lora_package):
    refit, engine, held = _refit(lora_package)
    built = {name: array.copy() for name, array in engine.weights.items()}
    engine.fail_next = True
    with pytest.raises(EngineError, match="failed to refit the engine for a:1"):
        refit.switch(held, A)
    assert held.variant is None, "what a refused refit left in the engine is unknown"
    refit.switch(held, ())
    assert set(engine.refits[-1]) == set(refit.base) and held.variant == ()
    for name, array in engine.weights.items():
        np.testing.assert_array_equal(array, built[name])


# ---- building refittable engines ------------------------------------------------------------


@pytest.fixture
def fake_builds(monkeypatch):
    """Exports with the TensorRT build stubbed: each plan says its ONNX graph and whether refittable."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    monkeypatch.setattr(tensorrt_engines, "check_builder", lambda: None)
    monkeypatch.setattr(tensorrt_engines, "gpu_identity", lambda device_id=0: H100)
    built = []

    def build_engine(trt, onnx_path, profiles, fp16, timing_cache, workspace_gib, refit=False):
        built.append((onnx_path.parent.name, refit))
        return f"plan {onnx_path} {refit}".encode(), timing_cache

    monkeypatch.setattr(tensorrt_engines, "build_engine", build_engine)
    return built


def _tensorrt_package(source: Path, folder: Path, refit: bool) -> Path:
    package = shutil.copytree(source, folder / "tensorrt")  # with the source's LoRAs
    manifest = msgspec.structs.replace(read_manifest(package), target="tensorrt")
    write_manifest(package, tensorrt_engines.build_engines(package, manifest, ["64x64"], [1], refit=refit))
    return package


def test_engine_keys_tell_refittable_engines_apart_and_old_keys_stay_valid():
    profile = {"sample": Profile((1, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8))}
    args = ("unet", "64x64", "a" * 64, profile, H100, TRT, "fp16")
    assert engine_key(*args) == engine_key(*args, refit=False) != engine_key(*args, refit=True)


def test_refit_builds_the_unet_and_text_encoder_refittable_and_records_it(lora_package, tmp_path, fake_builds):
    package = _tensorrt_package(lora_package, tmp_path, refit=True)
    manifest = read_manifest(package)
    section = msgspec.convert(manifest.extra["tensorrt"], TensorRTSection)
    assert section.refit
    assert {(e.component, e.refit) for e in section.engines} == {
        ("unet", True), ("text_encoder", True), ("vae_decoder", False), ("vae_encoder", False)}
    assert sorted(fake_builds) == [("text_encoder", True), ("unet", True), ("vae_decoder", False), ("vae_encoder", False)]
    check_compatible(manifest, section, package, H100, TRT)  # the keys hold the refit flag
    assert refit_refusal(section, package) is None


def test_a_rebuild_keeps_the_refit_choice_unless_told(lora_package, tmp_path, fake_builds, monkeypatch):
    monkeypatch.setattr(tensorrt_engines.logging, "basicConfig", lambda **kwargs: None)  # leave pytest's logging be
    package = _tensorrt_package(lora_package, tmp_path, refit=True)
    fake_builds.clear()
    assert tensorrt_engines.main([str(package)]) == 0
    assert fake_builds == [], "every engine's key still matched"
    # `kiln export` replacing the package: a new folder, a manifest without engines, the old one to reuse
    new = shutil.copytree(lora_package, tmp_path / "tensorrt.partial")
    fresh = msgspec.structs.replace(read_manifest(new), target="tensorrt")
    replaced = tensorrt_engines.build_engines(new, fresh, ["64x64"], [1], reuse_from=package)
    assert msgspec.convert(replaced.extra["tensorrt"], TensorRTSection).refit and fake_builds == []
    assert tensorrt_engines.main([str(package), "--no-refit"]) == 0
    assert sorted(fake_builds) == [("text_encoder", False), ("unet", False)], "the VAE's engines were reused"
    section = msgspec.convert(read_manifest(package).extra["tensorrt"], TensorRTSection)
    assert not section.refit and not any(e.refit for e in section.engines)
    assert "built without refit" in refit_refusal(section, package)


def test_build_engine_sets_refit_only_when_asked(tmp_path):
    flags = []

    class Config:
        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            flags[-1].append(flag.name)

        def create_timing_cache(self, data):
            return data

        def set_timing_cache(self, cache, ignore_mismatch):
            pass

        def add_optimization_profile(self, profile):
            pass

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

    class Builder:
        def __init__(self, logger):
            flags.append([])

        create_network = staticmethod(lambda flags: object())
        create_builder_config = staticmethod(Config)
        create_optimization_profile = staticmethod(lambda: types.SimpleNamespace(set_shape=lambda *shape: None))
        build_serialized_network = staticmethod(lambda network, config: b"plan")

    trt = fake_tensorrt()
    trt.Builder = Builder
    trt.OnnxParser = lambda network, logger: types.SimpleNamespace(parse_from_file=lambda path: True)
    profiles = {"sample": Profile((1, 4, 8, 8), (1, 4, 8, 8), (2, 4, 8, 8))}
    for refit in (False, True):
        assert tensorrt_engines.build_engine(trt, tmp_path / "model.onnx", profiles, True, b"", 1.0, refit=refit)[0] == b"plan"
    assert flags == [["FP16"], ["FP16", "REFIT"]]


# ---- the pipeline ---------------------------------------------------------------------------


@pytest.fixture
def engines_on_the_cpu(monkeypatch, fake_builds):
    """TensorRT engines without a GPU: each fake engine holds its graph's weights (refitted by the
    fake Refitter) and runs as an onnxruntime session over the weights it holds now."""
    import onnxruntime as ort

    from engine.tensorrt import runtime

    trt = sys.modules["tensorrt"]

    def deserialize(data: bytes):
        _, onnx, refit = data.decode().split()
        onnx = Path(onnx)
        component = read_manifest(onnx.parent.parent).components[onnx.parent.name]
        return FakeEngine(base_weights(onnx.parent.parent, component), DataType.FLOAT, refit == "True", onnx=onnx)

    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=deserialize)
    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    cupy.cuda = types.SimpleNamespace(Device=lambda device_id: contextlib.nullcontext(),
                                      Stream=lambda non_blocking: contextlib.nullcontext())
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr("engine.tensorrt.pipeline.gpu_identity", lambda device_id=0: H100)
    sessions = {}

    def infer(self, engine, feeds, whole):
        fake = engine.engine
        key = (id(fake), len(fake.refits))  # a new session after each refit
        if key not in sessions:
            so = ort.SessionOptions()
            so.log_severity_level = 3
            # As the cpu package's sessions: at "all", onnxruntime 1.32 builds Conv weights from the
            # file's initializers, not from add_initializer's (a conv LoRA would be lost).
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in fake.weights.items()}
            for name, value in values.items():
                so.add_initializer(name, value)
            sessions[key] = (ort.InferenceSession(str(fake.onnx), so, providers=["CPUExecutionProvider"]), values)
        return sessions[key][0].run(self.output_names, feeds)

    monkeypatch.setattr(runtime.TensorRTComponent, "_infer", infer)


def test_refitted_engines_make_the_cpu_packages_lora_images(lora_package, tmp_path, engines_on_the_cpu):
    from engine.pipeline import Pipeline

    pipe = Pipeline(_tensorrt_package(lora_package, tmp_path, refit=True), RuntimeOptions(threads=1))
    cpu = Pipeline(lora_package, RuntimeOptions(threads=1))
    assert type(pipe).__name__ == "TensorRTPipeline" and pipe.serves_loras
    assert pipe.limits().loras == ("a", "b")
    asks = [ImageRequest(**REQUEST), ImageRequest(**REQUEST, loras=(LoraChoice(name="a", scale=1.0),)),
            ImageRequest(**{**REQUEST, "seed": 8})]
    images, expected = pipe.generate(asks), cpu.generate(asks)
    for image, reference in zip(images, expected):
        assert np.array_equal(image, reference)
    assert np.abs(images[1].astype(int) - images[0]).mean() > 2, "the LoRA changed the image"
    assert pipe.unet.refit.refits == 1, "the two base images shared their steps; a's followed, one switch"
    assert pipe.text_encoders[0].refit.refits == 1  # base and a's prompts in one batch each
    again = pipe.generate([asks[0]])[0]  # back to the base: a's weights written back
    assert np.array_equal(again, images[0]) and pipe.unet.refit.refits == 2


def test_engines_without_refit_serve_no_loras_and_say_how_to_rebuild(lora_package, tmp_path, engines_on_the_cpu, caplog):
    from engine.errors import UnknownLoraError
    from engine.pipeline import Pipeline

    package = _tensorrt_package(lora_package, tmp_path, refit=False)
    pipe = Pipeline(package, RuntimeOptions(threads=1))
    assert not pipe.serves_loras and pipe.limits().loras == ()
    assert "LoRAs (a, b) are not served: its engines engines/" in caplog.text
    assert "text_encoder_any_" in caplog.text and "unet_64x64_" in caplog.text
    assert f"rebuild them refittable with `python -m export.tensorrt_engines {package} --refit`" in caplog.text
    with pytest.raises(UnknownLoraError, match="its LoRAs: none"):
        pipe.resolve(ImageRequest(**REQUEST, loras=(LoraChoice(name="a"),)))
    assert pipe.unet.refit is None
