"""The diffusers <-> original single-file layout: Kiln's writer, Kiln's reader, and diffusers' own converters agree."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from export.ldm_layout import component_prefix, original_key  # noqa: E402
from export.single_file import SingleFileOptions, load_single_file_pipeline, prepare_single_file  # noqa: E402
from export.single_file_writer import _component_state, original_vae_state, write_single_file  # noqa: E402
from export.vae_override import load_vae_override  # noqa: E402

ROOT_ARCH = "export/architectures"


def _diffusers_state(folder, component) -> dict:
    return {k: v for k, v in _component_state(folder / component).items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl", "sd1-inpaint"])
def test_round_trip_diffusers_to_original_to_diffusers_keeps_every_weight(family, tiny_checkpoint, tmp_path):
    folder = tiny_checkpoint(family)
    file = write_single_file(folder, tmp_path / "model.safetensors")
    single = prepare_single_file(file, SingleFileOptions(config=folder), tmp_path)
    pipe = load_single_file_pipeline(single)
    for component in single.info.components:
        expected = _diffusers_state(folder, component)
        got = getattr(pipe, component).state_dict()
        assert set(expected) <= set(got), component
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor.float()), f"{component}: {key}"


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl", "sd1-inpaint"])
def test_written_file_is_the_layout_diffusers_own_converters_read(family, tiny_checkpoint, tmp_path):
    """An independent reader: diffusers' convert_ldm_* functions turn Kiln's file back into the folder's weights."""
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = tiny_checkpoint(family)
    ck = load_file(str(write_single_file(folder, tmp_path / "model.safetensors")))
    config = lambda c: json.loads((folder / c / "config.json").read_text())  # noqa: E731
    converted = {
        "unet": sfu.convert_ldm_unet_checkpoint(ck, config("unet")),
        "vae": sfu.convert_ldm_vae_checkpoint(ck, config("vae")),
    }
    if family == "sd2v":
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        converted["text_encoder"] = sfu.convert_open_clip_checkpoint(te, ck, prefix="cond_stage_model.model.")
    else:
        converted["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ck)
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        converted["text_encoder_2"] = sfu.convert_open_clip_checkpoint(te2, ck, prefix="conditioner.embedders.1.model.")
    for component, got in converted.items():
        expected = _diffusers_state(folder, component)
        assert set(got) == set(expected), component
        assert all(torch.equal(got[k], expected[k]) for k in expected), component


@pytest.mark.parametrize(
    "arch,family,known",
    [
        # Keys that published checkpoints of each family hold (diffusers' single_file_utils tells families apart by them).
        ("sd15", "sd1", ["model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                         "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
                         "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight"]),
        ("sd21", "sd2", ["model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                         "cond_stage_model.model.token_embedding.weight",
                         "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"]),
        ("sdxl", "sdxl", ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",
                          "conditioner.embedders.1.model.text_projection",
                          "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
                          "model.diffusion_model.label_emb.0.0.weight",
                          "model.diffusion_model.output_blocks.8.0.skip_connection.weight"]),
    ],
)
def test_every_weight_of_the_real_architectures_has_its_published_name(arch, family, known):
    """The mapping covers all of SD 1.5's, SD 2.1's and SDXL's parameters (built on the meta device: no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = f"{ROOT_ARCH}/{arch}"
    names = set()
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f"{root}/unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(f"{root}/vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(f"{root}/text_encoder")),
        }
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(f"{root}/text_encoder_2"))
    for component, model in models.items():
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        for key, _ in model.named_parameters():
            names.add(component_prefix(family, component) + original_key(family, component, key, config).key)
    assert set(known) <= names


def test_vae_override_reads_original_and_diffusers_files_and_folders(tiny_checkpoint, tmp_path):
    from safetensors.torch import save_file

    from tests.test_export_single_file import perturbed_vae_folder

    other = perturbed_vae_folder(tiny_checkpoint("sd1") / "vae", tmp_path / "other")
    expected = _component_state(other)
    config_dir = tiny_checkpoint("sd1") / "vae"
    save_file(original_vae_state(other), str(tmp_path / "original.safetensors"))
    save_file(original_vae_state(other, prefix="first_stage_model."), str(tmp_path / "prefixed.safetensors"))
    save_file(expected, str(tmp_path / "diffusers.safetensors"))
    for source in ("original.safetensors", "prefixed.safetensors", "diffusers.safetensors", None):
        vae = load_vae_override(tmp_path / source if source else other, config_dir)
        got = vae.state_dict()
        assert not torch.equal(got["decoder.conv_out.weight"], _component_state(config_dir)["decoder.conv_out.weight"])
        assert all(torch.equal(got[k], v.float()) for k, v in expected.items()), source
