"""TARGET=openvino packages: OpenVINO IR with fp16 weights, run by OpenVINO's CPU plugin.

Tolerances against the diffusers PyTorch pipeline (same checkpoint, sampler, seed, latents):
  - precision f32: max abs difference <= 2/255, as for the onnxruntime cpu package (the IR
    stores weights in fp16, one rounding of each weight; seen here: at most 1 level from the cpu
    package's image);
  - precision auto (bf16 on CPUs with native bf16, as on this project's machines): PSNR >= 40 dB
    (bf16 keeps 8 significant bits; over a denoising loop that is a few levels here and there,
    not a different picture; seen here: 47.8-49.3 dB on these tiny models, 42-48 dB on the
    bundled model's 20-step images).
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest

ov = pytest.importorskip("openvino")

from engine.errors import IncompatiblePackageError, PackageError  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402
from engine.openvino.pipeline import OpenVINOPipeline  # noqa: E402
from engine.pipeline import ImageRequest, Pipeline  # noqa: E402
from engine.sessions import RuntimeOptions  # noqa: E402

from .test_engine_parity import diffusers_image  # noqa: E402

F32_TOLERANCE = 2  # uint8 levels
BF16_MIN_PSNR = 40.0  # dB
F32 = RuntimeOptions(threads=1, openvino_precision="f32")
AUTO = RuntimeOptions(threads=1, openvino_precision="auto")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def openvino_package(tiny_target_package):
    return lambda family: tiny_target_package(family, "openvino")


def test_package_is_ir_with_fp16_weights(openvino_package):
    package = openvino_package("sd1")
    manifest = read_manifest(package)
    assert (manifest.target, manifest.precision) == ("openvino", "fp16")
    assert manifest.extra["openvino"]["weights"] == "fp16"
    assert manifest.tools["openvino"]
    assert "vae_encoder" in manifest.components  # img2img and inpainting encode with it
    for name, component in manifest.components.items():
        assert component.file == f"{name}/model.xml"
        assert sorted(p.name for p in (package / name).iterdir()) == ["model.bin", "model.xml"]  # no ONNX left
    # The UNet's inputs and outputs keep the names and float32 interface the pipeline feeds.
    unet = manifest.components["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states"]
    model = ov.Core().read_model(str(package / "unet" / "model.xml"))
    assert {str(i.get_element_type()) for i in model.inputs} <= {"<Type: 'float32'>"}
    elements: Counter[str] = Counter()  # weight elements per element type
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            elements[str(op.get_output_element_type(0))] += int(np.prod(list(op.get_output_shape(0)) or [1]))
    assert elements.most_common(1)[0][0] == "<Type: 'float16'>", elements  # the weights are stored fp16


@pytest.mark.parametrize("family,sampler", [("sd1", "euler"), ("sd1", "dpmpp_2m_karras"), ("sd2v", "ddim"), ("sdxl", "euler")])
def test_f32_matches_diffusers(family, sampler, tiny_checkpoint, openvino_package, monkeypatch):
    req = ImageRequest(
        prompt="a red circle on a blue background", negative_prompt="blurry" if family != "sdxl" else "",
        width=64, height=96, seed=1234, steps=6, guidance_scale=5.0,
        guidance_rescale=0.7 if family == "sd2v" else 0.0, sampler=sampler,
    )
    pipe = Pipeline(openvino_package(family), F32)
    assert isinstance(pipe, OpenVINOPipeline) and pipe.precision.endswith("'float32'>")
    ours = pipe.generate([req])[0]
    theirs = diffusers_image(tiny_checkpoint(family), sampler, req, monkeypatch)
    assert ours.shape == theirs.shape == (96, 64, 3)
    diff = np.abs(ours.astype(int) - theirs.astype(int)).max()
    assert diff <= F32_TOLERANCE, f"max abs difference {diff} > {F32_TOLERANCE} levels"
    assert ours.std() > 0


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_auto_precision_is_close_to_diffusers(family, tiny_checkpoint, openvino_package, monkeypatch):
    req = ImageRequest(prompt="a green square", width=64, height=64, seed=7, steps=6, guidance_scale=5.0, sampler="euler")
    pipe = Pipeline(openvino_package(family), AUTO)
    capabilities = pipe.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" in capabilities:
        assert pipe.precision.endswith("'bfloat16'>"), pipe.precision  # what makes this target fast here
    ours = pipe.generate([req])[0]
    theirs = diffusers_image(tiny_checkpoint(family), "euler", req, monkeypatch)
    assert psnr(ours, theirs) >= BF16_MIN_PSNR, f"PSNR {psnr(ours, theirs):.1f} dB"


def test_one_compiled_model_serves_every_size_and_batch(openvino_package):
    """No session per resolution: one compiled UNet takes each size and batch, and a batch of
    mixed requests gives each image what it gets alone."""
    pipe = Pipeline(openvino_package("sd1"), F32)
    reqs = [
        ImageRequest(prompt="a red circle", width=64, height=64, seed=1, steps=3, guidance_scale=5.0),
        ImageRequest(prompt="a blue star", width=64, height=64, seed=2, steps=5, guidance_scale=1.0, sampler="ddim"),
        ImageRequest(prompt="a yellow square", width=96, height=64, seed=3, steps=4, guidance_scale=7.0),
    ]
    together = pipe.generate(reqs)
    for req, image in zip(reqs, together):
        alone = pipe.generate([req])[0]
        assert image.shape == (req.height, req.width, 3)
        assert np.abs(image.astype(int) - alone.astype(int)).max() <= F32_TOLERANCE
    shapes = {dict(s)["sample"] for s in pipe.unet.loaded_shapes}
    assert {(2, 4, 8, 8), (3, 4, 8, 8), (2, 4, 8, 12), (1, 4, 8, 8)} <= shapes, shapes


def test_refused_without_openvino(openvino_package, monkeypatch):
    package = openvino_package("sd1")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(IncompatiblePackageError, match=r"pip install 'kiln\[openvino\]'"):
        Pipeline(package)


def test_refuses_an_unknown_precision(openvino_package):
    with pytest.raises(IncompatiblePackageError, match="must be one of auto, bf16, f32"):
        Pipeline(openvino_package("sd1"), RuntimeOptions(openvino_precision="int4"))


def test_truncated_weights_are_a_package_error(openvino_package, tmp_path):
    import shutil

    broken = tmp_path / "sd1"
    shutil.copytree(openvino_package("sd1"), broken)
    weights = broken / "unet" / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PackageError, match="OpenVINO cannot load .*unet"):
        Pipeline(broken, F32)


def test_derived_from_a_cpu_package(tiny_package, tmp_path):
    from export.openvino_ir import derive_openvino_package

    out = derive_openvino_package(tiny_package("sd1"), tmp_path / "openvino")
    manifest = read_manifest(out)
    assert (manifest.target, manifest.precision) == ("openvino", "fp16")
    assert manifest.tools["openvino"] == ov.__version__.split("-")[0]
    assert manifest.source_digest == read_manifest(tiny_package("sd1")).source_digest
    assert Pipeline(out, F32).generate([ImageRequest(prompt="a red circle", width=64, height=64, seed=1, steps=2)])[0].std() > 0
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert derive_openvino_package(tiny_package("sd1"), out) == out  # up to date: not rebuilt
    assert (out / "manifest.json").stat().st_mtime_ns == mtime


def test_running_an_openvino_package_does_not_import_torch(openvino_package):
    import subprocess

    code = (
        "import sys; from engine.pipeline import ImageRequest, Pipeline; "
        f"p = Pipeline({str(openvino_package('sd1'))!r}); "
        "p.generate([ImageRequest(prompt='a red circle', width=64, height=64, seed=1, steps=2)]); "
        "assert type(p).__name__ == 'OpenVINOPipeline'; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers', 'optimum') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, f"the openvino pipeline imported {done.stdout} {done.stderr[-2000:]}"
