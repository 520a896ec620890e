"""TARGET=tensorrt without TensorRT: profiles, cache keys, manifest section, refusals and errors.

TensorRT cannot be installed here or on the GPU machines we reach, so engine building and the
CuPy runtime have never run. Everything around them is tested: the shape arithmetic of each
optimisation profile, what the engine key depends on, the manifest section an export writes
(with the TensorRT builder replaced by a stub), the refusal of engines built elsewhere or stale,
of sizes without engines, and the messages when tensorrt, CuPy or a GPU is missing.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import shutil
import subprocess
import sys
import threading
import types

import msgspec
import numpy as np
import pytest

from engine.errors import EngineError, IncompatiblePackageError, InvalidRequestError, PackageError
from engine.manifest import read_manifest, write_manifest
from engine.pipeline import ImageRequest, Pipeline
from engine.tensorrt import cache
from engine.tensorrt.cache import GpuIdentity, TensorRTSection, check_compatible, check_engine_size, engine_key
from engine.tensorrt.profiles import BatchRange, Profile, component_profiles
from export import tensorrt_engines
from export.targets import check_target_tools

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
TRT = "10.8.0.43"


def _profiles(package, name, size, batch=(1, 2, 4)):
    m = read_manifest(package)
    return component_profiles(name, m.components[name], size, BatchRange(batch), 77, m.latent_channels, m.vae_scale_factor)


# ---- profiles -----------------------------------------------------------------------------


def test_unet_profile_spans_one_row_to_two_per_image(tiny_package):
    p = _profiles(tiny_package("sd1"), "unet", "512x512")
    assert p["sample"] == Profile((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))
    assert p["timestep"] == Profile((1,), (2,), (8,))
    assert p["encoder_hidden_states"] == Profile((1, 77, 32), (2, 77, 32), (8, 77, 32))


def test_wide_sizes_put_width_last(tiny_package):
    p = _profiles(tiny_package("sd1"), "unet", "1792x1024", batch=(1,))
    assert p["sample"].max == (2, 4, 128, 224)  # (rows, C, H/8, W/8)
    assert _profiles(tiny_package("sd1"), "vae_decoder", "1024x1792", batch=(1,))["latent_sample"].max == (1, 4, 224, 128)


def test_vae_decodes_images_and_text_encoders_take_two_rows_an_image(tiny_package):
    package = tiny_package("sd1")
    assert _profiles(package, "vae_decoder", "512x512")["latent_sample"] == Profile((1, 4, 64, 64), (1, 4, 64, 64), (4, 4, 64, 64))
    assert _profiles(package, "text_encoder", None)["input_ids"] == Profile((2, 77), (2, 77), (8, 77))


def test_sdxl_conditioning_inputs_are_profiled(tiny_package):
    p = _profiles(tiny_package("sdxl"), "unet", "1024x1024", batch=(2,))
    assert p["text_embeds"] == Profile((1, 32), (4, 32), (4, 32))
    assert p["time_ids"] == Profile((1, 6), (4, 6), (4, 6))


def test_profile_arguments_are_checked(tiny_package):
    with pytest.raises(ValueError, match="BATCH must be whole numbers"):
        BatchRange((0, 2))
    with pytest.raises(ValueError, match="per size"):
        _profiles(tiny_package("sd1"), "unet", None)
    with pytest.raises(ValueError, match="for all sizes"):
        _profiles(tiny_package("sd1"), "text_encoder", "512x512")


# ---- keys -----------------------------------------------------------------------------------


def test_engine_key_changes_with_everything_an_engine_depends_on():
    profile = {"sample": Profile((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))}
    base = dict(component="unet", size="512x512", onnx_sha256="a" * 64, profile=profile, gpu=H100, tensorrt_version=TRT, precision="fp16")
    key = engine_key(**base)
    assert key == engine_key(**{**base, "profile": {"sample": profile["sample"].as_dict()}})  # as stored in the manifest
    changes = [
        {"gpu": GpuIdentity("NVIDIA H100 PCIe", "9.0")},
        {"gpu": GpuIdentity(H100.name, "8.9")},
        {"tensorrt_version": "10.9.0.34"},
        {"precision": "fp32"},
        {"onnx_sha256": "b" * 64},
        {"profile": {"sample": Profile((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64))}},
        {"size": "512x768"},
    ]
    assert len({key, *(engine_key(**{**base, **c}) for c in changes)}) == len(changes) + 1


# ---- an export with the builder stubbed -----------------------------------------------------


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """A `tensorrt` module that says its version; builds go through the stubbed build_engine."""
    module = types.ModuleType("tensorrt")
    module.__version__ = TRT
    module.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(tensorrt_engines, "check_builder", lambda: None)
    monkeypatch.setattr(tensorrt_engines, "gpu_identity", lambda device_id=0: H100)
    built = []

    def build_engine(trt, onnx_path, profiles, fp16, timing_cache, workspace_gib, refit=False):
        built.append((onnx_path.parent.name, fp16))
        return f"plan {onnx_path} {sorted(profiles)}".encode(), timing_cache + b"t"

    monkeypatch.setattr(tensorrt_engines, "build_engine", build_engine)
    return built


def _tensorrt_package(tiny_package, tmp_path, family="sd1", sizes=("64x64", "128x128"), batches=(1, 2)):
    package = shutil.copytree(tiny_package(family), tmp_path / family / "tensorrt")
    manifest = msgspec.structs.replace(read_manifest(package), target="tensorrt")
    manifest = tensorrt_engines.build_engines(package, manifest, sizes, batches)
    write_manifest(package, manifest)
    return package


def test_export_records_every_engine_in_the_manifest(tiny_package, tmp_path, fake_tensorrt):
    package = _tensorrt_package(tiny_package, tmp_path)
    manifest = read_manifest(package)
    section = msgspec.convert(manifest.extra["tensorrt"], TensorRTSection)
    assert (section.gpu, section.compute_capability, section.tensorrt_version) == (H100.name, "9.0", TRT)
    assert section.sizes == ["64x64", "128x128"] and section.batches == [1, 2]
    assert sorted((e.component, e.size) for e in section.engines) == [
        ("text_encoder", None), ("unet", "128x128"), ("unet", "64x64"), ("vae_decoder", "128x128"), ("vae_decoder", "64x64"),
        ("vae_encoder", "128x128"), ("vae_encoder", "64x64")]
    for entry in section.engines:
        assert (package / entry.file).stat().st_size == entry.bytes
        assert entry.key[:12] in entry.file
    assert (package / section.timing_cache).read_bytes() == b"t" * 7  # one cache, carried through every build
    check_compatible(manifest, section, package, H100, TRT)  # what the engine checks at load


def test_sdxl_vae_engine_is_built_without_fp16(tiny_package, tmp_path, fake_tensorrt):
    _tensorrt_package(tiny_package, tmp_path, family="sdxl", sizes=("64x64",))
    assert ("vae_decoder", False) in fake_tensorrt and ("vae_encoder", False) in fake_tensorrt and ("unet", True) in fake_tensorrt


def test_rebuild_reuses_engines_with_the_same_key_and_drops_stale_ones(tiny_package, tmp_path, fake_tensorrt):
    package = _tensorrt_package(tiny_package, tmp_path)
    fake_tensorrt.clear()
    manifest = tensorrt_engines.build_engines(package, read_manifest(package), ["64x64"], [1, 2])
    assert fake_tensorrt == []  # every engine's key matched one on disk
    assert sorted(p.stem.rsplit("_", 2)[1] for p in (package / "engines").glob("*.plan")) == ["64x64", "64x64", "64x64", "any"]
    assert msgspec.convert(manifest.extra["tensorrt"], TensorRTSection).sizes == ["64x64"]


# ---- refusals -------------------------------------------------------------------------------


def test_engines_from_another_gpu_or_tensorrt_are_refused_with_how_to_rebuild(tiny_package, tmp_path, fake_tensorrt):
    package = _tensorrt_package(tiny_package, tmp_path)
    manifest = read_manifest(package)
    section = cache.read_section(manifest, package)
    for gpu, version in ((GpuIdentity("NVIDIA L4", "8.9"), TRT), (H100, "10.9.0.34")):
        with pytest.raises(IncompatiblePackageError, match=r"built for NVIDIA H100 80GB HBM3 \(compute capability 9.0\) with "
                           r"TensorRT 10.8.0.43; this machine has .* rebuild them here with `python -m export.tensorrt_engines"):
            check_compatible(manifest, section, package, gpu, version)


def test_engines_stale_against_the_onnx_are_refused(tiny_package, tmp_path, fake_tensorrt):
    package = _tensorrt_package(tiny_package, tmp_path)
    manifest = read_manifest(package)
    unet = msgspec.structs.replace(manifest.components["unet"], sha256="0" * 64)  # re-exported graph
    stale = msgspec.structs.replace(manifest, components={**manifest.components, "unet": unet})
    with pytest.raises(IncompatiblePackageError, match="does not match the package's unet graph.*rebuild"):
        check_compatible(stale, cache.read_section(stale, package), package, H100, TRT)


def test_a_missing_engine_file_is_refused(tiny_package, tmp_path, fake_tensorrt):
    package = _tensorrt_package(tiny_package, tmp_path)
    section = cache.read_section(read_manifest(package), package)
    (package / section.engines[0].file).unlink()
    with pytest.raises(PackageError, match="missing or truncated; rebuild"):
        check_compatible(read_manifest(package), section, package, H100, TRT)


def test_a_size_without_engines_is_refused_listing_the_built_sizes():
    section = TensorRTSection(TRT, H100.name, "9.0", ["512x512", "1024x1024"], [1], [])
    check_engine_size(section, 512, 512)
    with pytest.raises(InvalidRequestError, match="size 768x768 has no TensorRT engine.*built sizes: 512x512, 1024x1024") as e:
        check_engine_size(section, 768, 768)
    assert e.value.param == "size"


def test_tensorrt_package_is_refused_here_naming_what_to_install(tiny_package, tmp_path, fake_tensorrt, monkeypatch):
    package = _tensorrt_package(tiny_package, tmp_path)
    monkeypatch.delitem(sys.modules, "tensorrt")
    with pytest.raises(IncompatiblePackageError, match="need tensorrt .*pip install tensorrt-cu12.* and cupy"):
        Pipeline(package)


def test_tensorrt_pipeline_refuses_unbuilt_sizes_and_runs_built_ones(tiny_package, tmp_path, fake_tensorrt, monkeypatch):
    """The pipeline's wiring, with each engine stood in for by the CPU session of its ONNX graph."""
    from engine.sessions import ComponentSessions, RuntimeOptions
    from engine.tensorrt import runtime

    package = _tensorrt_package(tiny_package, tmp_path)
    cupy = types.ModuleType("cupy")
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr("engine.tensorrt.pipeline.gpu_identity", lambda device_id=0: H100)

    handed = {}  # component -> (engine entries, input names, output names) the pipeline gave it

    class CpuStandIn:
        def __init__(self, package, name, entries, input_names, output_names, vae_scale_factor, device_id=0, refit=None):
            m = read_manifest(package)
            handed[name] = ({(e.component, e.size) for e in entries}, input_names, output_names)
            self.sessions = ComponentSessions(package, name, m.components[name], ["CPUExecutionProvider"], RuntimeOptions(threads=1))
            self.output_names = output_names

        def run(self, feeds, fixed_dims=None):
            return self.sessions.run(feeds, fixed_dims)

    monkeypatch.setattr(runtime, "TensorRTComponent", CpuStandIn)
    pipe = Pipeline(package)
    assert type(pipe).__name__ == "TensorRTPipeline"
    with pytest.raises(InvalidRequestError, match="built sizes: 64x64, 128x128"):
        pipe.generate([ImageRequest(prompt="a red circle", width=96, height=96, seed=1, steps=2)])
    req = ImageRequest(prompt="a red circle", width=64, height=64, seed=1, steps=2)
    plain = Pipeline(tiny_package("sd1")).generate([req])[0]
    np.testing.assert_array_equal(pipe.generate([req])[0], plain)
    manifest = read_manifest(package)
    for name, (entries, inputs, outputs) in handed.items():  # each component gets its own engines only
        sizes = {None} if name == "text_encoder" else {"64x64", "128x128"}
        assert entries == {(name, size) for size in sizes}
        assert inputs == [t.name for t in manifest.components[name].inputs]
        assert outputs == [t.name for t in manifest.components[name].outputs]
    assert {"text_encoder", "unet", "vae_decoder"} <= set(handed)


# ---- the runtime's engine choice and batch slicing (no GPU: the TensorRT launch is replaced) ----


def _component_without_a_gpu(name: str, sizes: list[str | None], max_rows: int, monkeypatch):
    """A TensorRTComponent whose engines are never loaded: `_infer` echoes each engine's size and
    the rows it was given, so what `run` picks and how it slices are visible."""
    from engine.tensorrt.runtime import TensorRTComponent, _Engine

    comp = object.__new__(TensorRTComponent)  # __init__ needs cupy and tensorrt
    comp.name, comp.input_names, comp.output_names, comp.vae_scale_factor = name, ["x"], ["y"], 8
    comp._lock, comp._device = threading.Lock(), contextlib.nullcontext()
    comp._engines = {size: _Engine(entry=None, engine=size, context=None, max_rows=max_rows) for size in sizes}
    calls = []

    def infer(engine, feeds, whole):
        calls.append((engine.engine, len(feeds["x"]), whole))
        return [feeds["x"] * 2]

    monkeypatch.setattr(comp, "_infer", infer)
    return comp, calls


def test_runtime_picks_the_engine_of_the_latent_size_and_slices_batches_over_its_profile(monkeypatch):
    unet, calls = _component_without_a_gpu("unet", ["64x64", "128x64"], max_rows=4, monkeypatch=monkeypatch)
    latents = np.arange(10 * 4 * 8 * 16, dtype=np.float32).reshape(10, 4, 8, 16)  # (B, C, H/8, W/8): 128x64
    (out,) = unet.run({"x": latents})
    np.testing.assert_array_equal(out, latents * 2)  # slices put back in order
    assert calls == [("128x64", 4, False), ("128x64", 4, False), ("128x64", 2, False)]
    calls.clear()
    unet.run({"x": latents[:3, :, :, :8]})  # fits one profile: run whole (inputs may stay resident)
    assert calls == [("64x64", 3, True)]
    with pytest.raises(EngineError, match="no TensorRT engine for 96x96; built: 64x64, 128x64"):
        unet.run({"x": np.zeros((1, 4, 12, 12), np.float32)})


def test_runtime_sizes_the_vae_encoder_by_its_pixels_and_a_shared_engine_by_nothing(monkeypatch):
    encoder, calls = _component_without_a_gpu("vae_encoder", ["64x64"], max_rows=2, monkeypatch=monkeypatch)
    encoder.run({"x": np.zeros((1, 3, 64, 64), np.float32)})  # (B, 3, H, W): pixels, not latents
    text, text_calls = _component_without_a_gpu("text_encoder", [None], max_rows=8, monkeypatch=monkeypatch)
    text.run({"x": np.zeros((2, 77), np.int32)})
    assert calls == [("64x64", 1, True)] and text_calls == [(None, 2, True)]


# ---- errors at export -----------------------------------------------------------------------


def test_export_without_tensorrt_names_what_to_install(monkeypatch):
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(PackageError, match=r"TARGET=tensorrt needs tensorrt.*not installed: install tensorrt \(NVIDIA TensorRT 10"):
        check_target_tools("tensorrt")


def test_kiln_export_tensorrt_exits_non_zero_here(tiny_checkpoint, tmp_path, caplog):
    from kiln.cli import main

    assert main(["export", str(tiny_checkpoint("sd1")), "--target", "tensorrt", "--out", str(tmp_path)]) == 2
    assert "pip install tensorrt-cu12" in caplog.text
    assert not any(tmp_path.iterdir())


def test_tensorrt_without_a_gpu_says_so(monkeypatch):
    module = types.ModuleType("tensorrt")
    module.__version__ = TRT

    class Logger:
        ERROR = 0

        def __init__(self, level):
            pass

    def builder(logger):  # what TensorRT's binding does when CUDA cannot start
        raise TypeError("pybind11::init(): factory function returned nullptr")

    module.Logger, module.Builder = Logger, builder
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    with pytest.raises(PackageError, match="cannot create a builder .*engines are built on the NVIDIA GPU they will run on"):
        tensorrt_engines.check_builder()


def test_no_gpu_is_named_when_nothing_can_see_one(monkeypatch):
    # CuPy, cuda-python and nvidia-smi all absent, whatever this machine has installed
    for module in ("cupy", "cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of a None entry raises ImportError
    monkeypatch.setattr(cache.shutil, "which", lambda name: None)
    with pytest.raises(PackageError, match="no NVIDIA GPU 0 is visible"):
        cache.gpu_identity()


def test_the_gpu_is_named_from_nvidia_smi_when_python_cannot_see_it(monkeypatch):
    for module in ("cupy", "cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setattr(cache.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    asked = []

    def nvidia_smi(cmd, **kwargs):
        asked.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H100 80GB HBM3, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n")

    monkeypatch.setattr(cache.subprocess, "run", nvidia_smi)
    assert cache.gpu_identity(1) == H100
    assert asked[0][1] == "--id=1"
