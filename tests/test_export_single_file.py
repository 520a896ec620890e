"""`kiln export model.safetensors`: detection, refusals, the same images as the folder, rebuilds, --vae.

Single files are made from the tiny test checkpoints by export.single_file_writer; their tiny
configs come in through --config (a real file takes export/architectures/<family>).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.errors import CheckpointError  # noqa: E402
from engine.manifest import read_manifest  # noqa: E402
from engine.pipeline import ImageRequest, Pipeline  # noqa: E402
from export.package import build_package  # noqa: E402
from export.single_file import SingleFileOptions, prepare_single_file  # noqa: E402
from export.single_file_writer import original_vae_state, single_file_state, write_single_file  # noqa: E402

TOLERANCE = 2  # uint8 levels, as tests/test_engine_parity.py
U = "model.diffusion_model."


def save(tensors: dict, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def marker_file(path, keys: dict[str, tuple[int, ...]]):
    """A .safetensors file holding zeros under the given names: enough for what is read from headers."""
    return save({k: torch.zeros(shape) for k, shape in keys.items()}, path)


def unet_in(channels: int) -> dict:
    return {U + "input_blocks.0.0.weight": (8, channels, 3, 3)}


def image(package, family: str) -> np.ndarray:
    req = ImageRequest(prompt="a red circle on a blue background", negative_prompt="blurry" if family != "sdxl" else "",
                       width=64, height=96, seed=1234, steps=5, guidance_scale=5.0, sampler="euler")
    return Pipeline(package).generate([req])[0]


def kiln_export(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", "export", *args], capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    """family -> the tiny checkpoint written as one original-layout .safetensors file."""
    root = tmp_path_factory.mktemp("single")
    return {f: write_single_file(tiny_checkpoint(f), root / f"{f}.safetensors") for f in ("sd1", "sd2v", "sdxl")}


@pytest.fixture(scope="module")
def offline_cli_export(files, tiny_checkpoint, tmp_path_factory):
    """The sd2v file exported by `kiln export` with no hub cache and every proxy pointing at a closed port."""
    root = tmp_path_factory.mktemp("cli")
    hf_home = root / "hf-home"
    hf_home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9", NO_PROXY="", no_proxy="")
    done = kiln_export(str(files["sd2v"]), "--config", str(tiny_checkpoint("sd2v")), "--out", str(root / "out"), env=env)
    return done, root / "out" / "sd2v" / "cpu", hf_home


@pytest.fixture(scope="module")
def single_packages(files, tiny_checkpoint, offline_cli_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    packages = {f: build_package(files[f], root, single_file=SingleFileOptions(config=tiny_checkpoint(f)))
                for f in ("sd1", "sdxl")}  # fmt: skip
    packages["sd2v"] = offline_cli_export[1]
    return packages


# --- the same package path and images as the folder ------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_single_file_draws_the_folders_images(family, single_packages, tiny_package):
    ours, folder = image(single_packages[family], family), image(tiny_package(family), family)
    assert ours.shape == folder.shape == (96, 64, 3) and ours.std() > 0
    diff = np.abs(ours.astype(int) - folder.astype(int)).max()
    assert diff <= TOLERANCE, f"max abs difference {diff} > {TOLERANCE} levels"


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_single_file_manifest_matches_the_folders_and_names_the_file(family, single_packages, tiny_package, files):
    single, folder = read_manifest(single_packages[family]), read_manifest(tiny_package(family))
    for field in ("family", "prediction_type", "sizes", "defaults", "scheduler_config", "unet_in_channels",
                  "vae_scaling_factor", "force_zeros_for_empty_prompt", "tokenizers"):
        assert getattr(single, field) == getattr(folder, field), field
    assert {n: (c.inputs, c.outputs) for n, c in single.components.items()} == {
        n: (c.inputs, c.outputs) for n, c in folder.components.items()}
    assert single.source_path == str(files[family].resolve())
    assert single.source_files[files[family].name] == __import__("hashlib").sha256(files[family].read_bytes()).hexdigest()


def test_cli_export_reaches_for_no_network(offline_cli_export):
    done, package, hf_home = offline_cli_export
    assert done.returncode == 0, done.stderr
    assert read_manifest(package).prediction_type == "v_prediction"
    assert not any(hf_home.rglob("*")), "something was fetched into the hub cache"


# --- detection and refusals by name ------------------------------------------------------------


@pytest.mark.parametrize(
    "keys,match",
    [
        ({**unet_in(4), "conditioner.embedders.0.model.text_projection": (4, 4)}, "SDXL refiner"),
        ({U + "joint_blocks.0.context_block.attn.qkv.weight": (3, 1)}, "SD3"),
        ({"double_blocks.0.img_attn.qkv.weight": (3, 1)}, "Flux"),
        ({"pos_embed": (1, 1), "x_embedder.proj.weight": (1, 1)}, "DiT"),
        ({"encoder.down.0.block.0.conv1.weight": (1, 1), "decoder.conv_out.weight": (1, 1)}, "VAE on its own.*--vae"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (1, 1)}, "LoRA"),
        ({**unet_in(8), "cond_stage_model.transformer.text_model.final_layer_norm.weight": (4,)}, "8 input channels"),
        (unet_in(4), "no text encoder"),
        ({"down_blocks.0.resnets.0.conv1.weight": (1, 1)}, "diffusers component"),
    ],
    ids=["refiner", "sd3", "flux", "dit", "vae", "lora", "pix2pix", "unet-only", "diffusers-unet"],
)
def test_unsupported_files_are_refused_naming_what_was_found(keys, match, tmp_path):
    path = marker_file(tmp_path / "model.safetensors", keys)
    with pytest.raises(CheckpointError, match=match):
        prepare_single_file(path, SingleFileOptions(), tmp_path)


@pytest.mark.parametrize(
    "text_key,inpaint_channels,expect",
    [
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", 4, ("sd1", False, "StableDiffusionPipeline")),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", 9, ("sd1", True, "StableDiffusionInpaintPipeline")),
        ("conditioner.embedders.1.model.ln_final.weight", 4, ("sdxl", False, "StableDiffusionXLPipeline")),
        ("conditioner.embedders.1.model.ln_final.weight", 9, ("sdxl", True, "StableDiffusionXLInpaintPipeline")),
    ],
)
def test_family_and_inpainting_detected_and_repo_configs_chosen(text_key, inpaint_channels, expect, tmp_path):
    path = marker_file(tmp_path / "model.safetensors", {**unet_in(inpaint_channels), text_key: (4,)})
    single = prepare_single_file(path, SingleFileOptions(), tmp_path)
    index = json.loads((single.info.path / "model_index.json").read_text())
    assert (single.detected.family, single.detected.inpaint, index["_class_name"]) == expect
    unet = json.loads((single.info.path / "unet" / "config.json").read_text())
    assert unet["in_channels"] == inpaint_channels
    assert (single.info.path / "tokenizer" / "vocab.json").is_file()


def test_sd2_file_needs_the_flags_its_weights_cannot_answer(tmp_path):
    path = marker_file(tmp_path / "sd21.safetensors", {**unet_in(4), "cond_stage_model.model.token_embedding.weight": (4, 4)})
    with pytest.raises(CheckpointError, match=r"SD 2\.x.*--prediction-type and --default-size"):
        prepare_single_file(path, SingleFileOptions(), tmp_path)
    with pytest.raises(CheckpointError, match=r"pass --default-size \("):
        prepare_single_file(path, SingleFileOptions(prediction_type="epsilon"), tmp_path)
    single = prepare_single_file(path, SingleFileOptions(prediction_type="epsilon", default_size=512), tmp_path)
    assert (single.info.family, single.info.prediction_type) == ("sd2", "epsilon")
    unet = json.loads((single.info.path / "unet" / "config.json").read_text())
    text = json.loads((single.info.path / "text_encoder" / "config.json").read_text())
    assert unet["sample_size"] == 64 and text["hidden_size"] == 1024  # SD 2.1's architecture, 512 native
    v768 = prepare_single_file(path, SingleFileOptions(prediction_type="v_prediction", default_size=768), tmp_path)
    assert v768.info.digest != single.info.digest  # the answers are part of what the package is rebuilt on


def test_cli_names_the_missing_flag(tmp_path):
    path = marker_file(tmp_path / "sd21.safetensors", {**unet_in(4), "cond_stage_model.model.token_embedding.weight": (4, 4)})
    done = kiln_export(str(path), "--prediction-type", "v_prediction", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "--default-size" in done.stderr
    assert not (tmp_path / "out").exists()


def test_single_file_flags_on_a_folder_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="single-file"):
        build_package(tiny_checkpoint("sd1"), tmp_path, single_file=SingleFileOptions(prediction_type="epsilon"))


def test_tiny_file_against_the_real_architecture_names_the_mismatch_and_config(files, tmp_path):
    with pytest.raises(CheckpointError, match=r"wants \[.*--config"):
        build_package(files["sd1"], tmp_path / "out")
    assert not (tmp_path / "out" / "sd1").exists() or not any((tmp_path / "out" / "sd1").iterdir())


# --- bad files: a clear error, nothing half-made ---------------------------------------------


def _no_package(root) -> bool:
    return not any(p.name.endswith(("cpu", ".partial")) for p in root.rglob("*")) if root.exists() else True


def test_pickles_are_refused_with_the_reason_and_how_to_convert(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "model.ckpt")
    shutil.copyfile(tmp_path / "model.ckpt", tmp_path / "renamed.safetensors")
    for name in ("model.ckpt", "renamed.safetensors"):
        with pytest.raises(CheckpointError, match=r"arbitrary code.*weights_only=True.*save_file"):
            build_package(tmp_path / name, tmp_path / "out")
    assert _no_package(tmp_path / "out")


def test_truncated_file_is_refused(files, tmp_path):
    data = files["sd1"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    (tmp_path / "stub.safetensors").write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        build_package(tmp_path / "cut.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointError, match="truncated"):
        build_package(tmp_path / "stub.safetensors", tmp_path / "out")
    assert _no_package(tmp_path / "out")


def test_non_safetensors_file_is_refused(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are not the weights you are looking for\n" * 10)
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 7) + b"{broken" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        build_package(tmp_path / "notes.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointError, match="header is not JSON"):
        build_package(tmp_path / "json.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_package(tmp_path / "missing.safetensors", tmp_path / "out")


def test_header_that_lies_about_sizes_is_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}).encode()
    (tmp_path / "liar.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"lies about tensor x: F32 \[4, 4\] is 64 bytes"):
        build_package(tmp_path / "liar.safetensors", tmp_path / "out")


def test_file_missing_weights_fails_in_loading_and_leaves_nothing(files, tiny_checkpoint, tmp_path):
    state = single_file_state(tiny_checkpoint("sd1"))
    del state[U + "out.2.weight"]
    path = save(state, tmp_path / "holed.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 of the unet's weights \(e\.g\. model\.diffusion_model\.out\.2\.weight"):
        build_package(path, tmp_path / "out", single_file=SingleFileOptions(config=tiny_checkpoint("sd1")))
    assert _no_package(tmp_path / "out")


# --- changed files rebuild; --vae --------------------------------------------------------------


def perturbed_vae_folder(vae_folder, dest):
    """A copy of the diffusers VAE folder `vae_folder` with other weights (seeded noise added)."""
    from export.single_file_writer import _component_state

    dest.mkdir(parents=True)
    shutil.copyfile(vae_folder / "config.json", dest / "config.json")
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in _component_state(vae_folder).items()}
    save(state, dest / "diffusion_pytorch_model.safetensors")
    return dest


@pytest.fixture(scope="module")
def other_vae(tiny_checkpoint, tmp_path_factory):
    """A VAE of the tiny SD 1.x shape with other weights: its diffusers folder, and an original-layout VAE-only file."""
    root = tmp_path_factory.mktemp("vae")
    vae_folder = perturbed_vae_folder(tiny_checkpoint("sd1") / "vae", root / "vae")
    return vae_folder, save(original_vae_state(vae_folder), root / "other-vae.safetensors")


def test_changed_file_rebuilds_and_vae_override_equals_the_vae_in_the_file(
    files, tiny_checkpoint, tiny_package, other_vae, tmp_path, caplog
):
    options = SingleFileOptions(config=tiny_checkpoint("sd1"))
    file = shutil.copyfile(files["sd1"], tmp_path / "model.safetensors")
    first = build_package(file, tmp_path / "out", single_file=options)
    before = read_manifest(first)
    build_package(file, tmp_path / "out", single_file=options)
    assert "up to date" in caplog.text

    vae_folder, vae_file = other_vae
    write_single_file(tiny_checkpoint("sd1"), file, vae_from=vae_folder)  # the same file, changed on disk
    after = read_manifest(build_package(file, tmp_path / "out", single_file=options))
    assert after.source_digest != before.source_digest
    rebuilt_image = image(first, "sd1")
    assert np.abs(rebuilt_image.astype(int) - image(tiny_package("sd1"), "sd1").astype(int)).max() > TOLERANCE  # new VAE

    overridden = build_package(tiny_checkpoint("sd1"), tmp_path / "out", name="folder-vae", vae=vae_file)
    manifest = read_manifest(overridden)
    assert manifest.source_files["vae-override/other-vae.safetensors"]
    diff = np.abs(image(overridden, "sd1").astype(int) - rebuilt_image.astype(int)).max()
    assert diff <= TOLERANCE, f"folder + --vae differs from the file holding that VAE by {diff} levels"
