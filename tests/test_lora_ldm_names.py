"""kohya LoRAs whose UNet modules carry original (ldm) names, as sd-scripts writes them for SDXL
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`): matched through the package's own
block layout (engine/lora/ldm_names.py), with deltas identical to the diffusers-named file's."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.lora import LoraMismatchError, match_lora  # noqa: E402
from engine.lora.apply import package_targets  # noqa: E402
from engine.lora.ldm_names import UnetBlocks, ldm_unet_key, ldm_unet_names  # noqa: E402
from export.ldm_layout import original_key  # noqa: E402
from tests.conftest import TINY  # noqa: E402
from tests.test_lora_files import RANK, TE_MODULES, _package_weights, _torch_fused, assert_fused_by_diffusers, pipeline, random_pairs_for, write_kohya  # noqa: E402, F401

# Every kind of UNet module a kohya LoRA can name, as the file spells it in the ldm layout.
LDM_FORMS = (
    "input_blocks_0_0",  # conv_in
    "time_embed_0",
    "_in_layers_2", "_out_layers_3", "_emb_layers_1", "_skip_connection",  # resnets
    "_0_op",  # a downsampler
    "_conv",  # an upsampler
    "_proj_in", "_proj_out", "_attn1_to_q", "_attn2_to_out_0", "_ff_net_0_proj", "_ff_net_2",
    "middle_block_1_", "output_blocks_",
    "out_2",  # conv_out
)  # fmt: skip
TE_KEYS = {  # what kohya writes for SDXL's two text encoders (Hugging Face CLIP names)
    "sdxl": ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1"),
    "sd1": ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",),
}


def _unet_config(family: str) -> dict:
    return json.loads((TINY / family / "unet" / "config.json").read_text())


def _ldm_module(family: str, module: str) -> str:
    """The original name of a diffusers UNet module, by the single-file checkpoint mapping."""
    return original_key(family, "unet", f"{module}.weight", _unet_config(family)).key.removesuffix(".weight")


def _every_pair(pipe, seed: int, alpha: float | None = None) -> list[tuple[str, str, torch.Tensor, torch.Tensor, float]]:
    """(component, diffusers module, down, up, alpha) for every Linear and Conv2d of the UNet, and
    TE_MODULES of each text encoder's first layer; random weights, alphas differing.

    The text encoders get test_lora_files' set: diffusers' kohya converter reads a q_proj LoRA
    right only beside an out_proj one (seen with 0.39; without, it loads q_proj as `to_q_lora`
    and drops it)."""
    modules = [("unet", n, m) for n, m in pipe.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for component in ("text_encoder", "text_encoder_2"):
        if hasattr(pipe, component):
            for name in (f"text_model.encoder.layers.0.{m}" for m in TE_MODULES):
                modules.append((component, name, getattr(pipe, component).get_submodule(name)))
    return random_pairs_for(modules, seed, alpha)


def _ldm_named(family: str, pairs):
    return [(c, _ldm_module(family, n) if c == "unet" else n, d, u, a) for c, n, d, u, a in pairs]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_named_lora_has_the_deltas_of_the_diffusers_named_one(tiny_package, pipeline, tmp_path, family):
    from safetensors import safe_open

    package, pipe = tiny_package(family), pipeline(family)
    pairs = _every_pair(pipe, seed=11)
    ldm_file = write_kohya(_ldm_named(family, pairs), tmp_path / "ldm.safetensors", family)
    diffusers_file = write_kohya(pairs, tmp_path / "diffusers.safetensors", family)
    with safe_open(str(ldm_file), "np") as f:
        keys = list(f.keys())
    for form in LDM_FORMS + TE_KEYS[family]:
        assert any(form in k for k in keys), f"the test file names no {form} module"
    matched = match_lora(package, ldm_file)
    assert len(matched.pairs) == len(pairs)
    got, want = matched.deltas(0.75), match_lora(package, diffusers_file).deltas(0.75)
    assert {c: sorted(d) for c, d in got.items()} == {c: sorted(d) for c, d in want.items()}
    for component, by_init in want.items():
        for initializer, delta in by_init.items():
            np.testing.assert_array_equal(got[component][initializer], delta, err_msg=initializer)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_ldm_named_lora_equals_the_torch_fused_weights(tiny_package, pipeline, tmp_path, family):
    package, pipe = tiny_package(family), pipeline(family)
    pairs = _every_pair(pipe, seed=12)
    path = write_kohya(_ldm_named(family, pairs), tmp_path / "ldm.safetensors", family)
    expected = _torch_fused(pipe, pairs, 0.5)
    compared = 0
    for component, by_init in match_lora(package, path).deltas(0.5).items():
        index, arrays = _package_weights(package, component)
        for initializer, delta in by_init.items():
            fused = expected[component, index[initializer].get("param", initializer)]
            result = arrays[initializer] + delta
            result = result.T if index[initializer].get("transposed") else result
            np.testing.assert_allclose(result.reshape(fused.shape), fused, rtol=1e-5, atol=1e-6, err_msg=initializer)
            compared += 1
    assert compared == len(pairs)


@pytest.mark.parametrize(
    "module",
    [
        "input_blocks_99_1_transformer_blocks_0_attn1_to_q",  # past the last input block
        "output_blocks_1_1_conv",  # the upsampler of a level with attention is output_blocks_1_2_conv
        "middle_block_1_transformer_blocks_7_attn1_to_q",  # deeper than the package's transformer
    ],
)
def test_ldm_name_of_no_module_is_refused_naming_its_keys(tiny_package, pipeline, tmp_path, module):
    from safetensors.torch import load_file, save_file

    path = write_kohya(_ldm_named("sdxl", _every_pair(pipeline("sdxl"), seed=13)[:3]), tmp_path / "a.safetensors", "sdxl")
    sd = load_file(str(path))
    key = f"lora_unet_{module}"
    sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = torch.ones(RANK, 32), torch.ones(32, RANK)
    sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path))
    with pytest.raises(LoraMismatchError, match="3 of its 12 keys match no weight") as e:
        match_lora(tiny_package("sdxl"), path)
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        assert key + suffix in str(e.value)


@pytest.mark.parametrize("family", ["sd1", "sd2v", "sdxl"])
def test_block_layout_read_from_a_package_is_its_configs(tiny_package, family):
    """The package has no config.json: its parameter names give the same ldm names as the config."""
    params = package_targets(tiny_package(family))["unet"]
    blocks = UnetBlocks.from_param_names(params)
    assert blocks == UnetBlocks.from_config(_unet_config(family))
    names = ldm_unet_names(params)
    assert sorted(names.values()) == sorted(params)
    for ldm, param in names.items():
        assert ldm == original_key(family, "unet", param, _unet_config(family)).key


def test_real_sdxl_layout_names_the_blocks_as_kohya_does():
    """SDXL 1.0's UNet: 3 levels of 2 resnets, attention on all but the outermost (up: first two)."""
    blocks = UnetBlocks.from_config(
        {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
    )
    expected = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight": "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.2.resnets.1.conv1.weight": "input_blocks.8.0.in_layers.2.weight",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "up_blocks.0.attentions.1.proj_in.weight": "output_blocks.1.1.proj_in.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
        "up_blocks.1.resnets.0.conv_shortcut.weight": "output_blocks.3.0.skip_connection.weight",
        "up_blocks.2.resnets.2.time_emb_proj.weight": "output_blocks.8.0.emb_layers.1.weight",
        "add_embedding.linear_1.weight": "label_emb.0.0.weight",
        "time_embedding.linear_2.weight": "time_embed.2.weight",
        "conv_out.weight": "out.2.weight",
    }  # fmt: skip
    assert {key: ldm_unet_key(key, blocks) for key in expected} == expected


def test_diffusers_loads_the_ldm_named_file_to_the_same_weights(tiny_package, tiny_checkpoint, tmp_path):
    """diffusers' kohya converter (its sgm block remapping) and fuse_lora, against package + delta.

    One alpha for every module, as in test_lora_files: diffusers files some alphas under other names."""
    pytest.importorskip("peft")
    from diffusers import DiffusionPipeline

    package = tiny_package("sdxl")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_checkpoint("sdxl")))
    pairs = _ldm_named("sdxl", _every_pair(pipe, seed=14, alpha=2.0))
    path = write_kohya(pairs, tmp_path / "ldm.safetensors", "sdxl")
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.5, components=["unet", "text_encoder", "text_encoder_2"])
    assert assert_fused_by_diffusers(pipe, package, match_lora(package, path).deltas(0.5)) == len(pairs)
