"""Export: what the package holds, reuse by hash, refusals, and the CLI around it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("torch")

from engine.errors import CheckpointError  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402
from export.checkpoint import inspect_checkpoint  # noqa: E402
from export.package import build_package  # noqa: E402


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "family,expect",
    [
        ("sd1", ("sd1", "epsilon", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])),
        ("sd2v", ("sd2", "v_prediction", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])),
        ("sdxl", ("sdxl", "epsilon", ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"])),
    ],
)
def test_manifest_describes_the_package(tiny_package, family, expect):
    package = tiny_package(family)
    m = read_manifest(package)
    assert (m.family, m.prediction_type, sorted(m.components)) == expect
    unet = m.components["unet"]
    assert [i.name for i in unet.inputs][:3] == ["sample", "timestep", "encoder_hidden_states"]
    assert unet.inputs[1].shape == ["batch_size"]  # one timestep per sample
    for comp in m.components.values():
        assert (package / comp.file).is_file() and (package / comp.weights_file).is_file()
    assert all((package / t.folder / "tokenizer.json").is_file() for t in m.tokenizers)
    assert len(m.source_digest) == 64 and m.source_files
    assert {"torch", "diffusers", "onnx"} <= set(m.tools)
    assert m.opset == 17 and m.target == "cpu"
    assert m.unet_in_channels == unet.inputs[0].shape[1] == 4


def test_unchanged_checkpoint_reuses_the_package_and_force_rebuilds(tiny_checkpoint, tmp_path, caplog):
    first = build_package(tiny_checkpoint("sd1"), tmp_path, name="p")
    stamp = (first / "manifest.json").stat().st_mtime_ns
    again = build_package(tiny_checkpoint("sd1"), tmp_path, name="p")
    assert again == first and (first / "manifest.json").stat().st_mtime_ns == stamp
    assert "up to date" in caplog.text
    build_package(tiny_checkpoint("sd1"), tmp_path, name="p", force=True)
    assert (first / "manifest.json").stat().st_mtime_ns != stamp


def test_changed_checkpoint_is_re_exported(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ck")
    first = read_manifest(build_package(ck, tmp_path / "out", name="p")).source_digest
    sched = ck / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert read_manifest(build_package(ck, tmp_path / "out", name="p")).source_digest != first


def test_missing_checkpoint_folder_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "nope")


def test_corrupt_model_index_is_refused(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ck")
    (ck / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        inspect_checkpoint(ck)


def test_unsupported_pipeline_is_refused_naming_what_was_found(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ck")
    index = json.loads((ck / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (ck / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="FluxPipeline"):
        inspect_checkpoint(ck)


def test_missing_weights_and_tokenizer_are_refused(tiny_checkpoint, tmp_path):
    ck = shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ck")
    for f in (ck / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        inspect_checkpoint(ck)
    ck2 = shutil.copytree(tiny_checkpoint("sd1"), tmp_path / "ck2")
    shutil.rmtree(ck2 / "tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer"):
        inspect_checkpoint(ck2)


def test_cli_export_of_a_bad_folder_exits_non_zero(tmp_path):
    done = kiln("export", str(tmp_path / "missing"), "--out", str(tmp_path))
    assert done.returncode != 0
    assert "does not exist" in done.stderr


def test_cli_generate_and_info(tiny_package, tmp_path):
    out = tmp_path / "img.png"
    done = kiln("generate", "a red circle on a blue background", "--package", str(tiny_package("sd1")),
                "--size", "64x64", "--steps", "3", "--seed", "7", "-o", str(out))
    assert done.returncode == 0, done.stderr
    from PIL import Image

    assert Image.open(out).size == (64, 64)
    bad = kiln("generate", "x", "--package", str(tiny_package("sd1")), "--size", "65x64", "-o", str(out))
    assert bad.returncode != 0 and re.search(r"multiples? of 8", bad.stderr)
    info = kiln("info", str(tiny_package("sdxl")))
    assert info.returncode == 0 and "text_encoder_2" in info.stdout and "sdxl" in info.stdout
