"""Where each diffusers weight lives in an original (CompVis / Stability "ldm") single-file checkpoint.

A single-file Stable Diffusion checkpoint (`model.safetensors` as the original repositories, A1111
and ComfyUI write them) holds every component under one prefix each:

    model.diffusion_model.*             UNet (ldm `openaimodel` block numbering)
    first_stage_model.*                 VAE (ldm `Encoder`/`Decoder`)
    cond_stage_model.transformer.*      SD 1.x text encoder (Hugging Face CLIP names)
    cond_stage_model.model.*            SD 2.x text encoder (OpenCLIP names)
    conditioner.embedders.0.transformer.*   SDXL text encoder 1 (Hugging Face CLIP names)
    conditioner.embedders.1.model.*         SDXL text encoder 2 (OpenCLIP names)

`original_key(kind, key, config)` names, for one diffusers state-dict key, the original key and
how its tensor is got from there: as is, one third of OpenCLIP's fused q/k/v projection, or
transposed (OpenCLIP's `text_projection` is stored (width, dim), a Linear weight is (dim, width)).
The mapping is the one diffusers' `convert_ldm_*` / `convert_open_clip_checkpoint` functions and
its `scripts/convert_diffusers_to_original_stable_diffusion.py` apply, written as one function per
component so that the loader (export/single_file.py) and the writer
(export/single_file_writer.py) cannot disagree; the UNet's lives in engine/lora/ldm_names.py,
which the engine's LoRA reader shares. Shapes that differ only by trailing 1s (the ldm
VAE's 1x1-conv attention projections against diffusers' Linear ones) are reshaped by the callers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.lora.ldm_names import UnetBlocks, ldm_unet_key

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIXES = {  # (family, component) -> prefix
    ("sd1", "text_encoder"): "cond_stage_model.transformer.",
    ("sd2", "text_encoder"): "cond_stage_model.model.",
    ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer.",
    ("sdxl", "text_encoder_2"): "conditioner.embedders.1.model.",
}
# Components whose original layout is OpenCLIP's rather than Hugging Face CLIP's.
OPEN_CLIP = {("sd2", "text_encoder"), ("sdxl", "text_encoder_2")}


@dataclass(frozen=True)
class Source:
    """Where one diffusers tensor comes from in the original layout."""

    key: str  # the original key, without the component prefix
    part: int | None = None  # 0/1/2: q/k/v third of a fused in_proj tensor (dim 0)
    transpose: bool = False


def component_prefix(family: str, component: str) -> str:
    if component == "unet":
        return UNET_PREFIX
    if component == "vae":
        return VAE_PREFIX
    return CLIP_PREFIXES[family, component]


def original_key(family: str, component: str, key: str, config: dict) -> Source:
    """The original-layout source of diffusers state-dict `key` of `component` (config: its config.json)."""
    if component == "unet":
        return Source(_unet_key(key, config))
    if component == "vae":
        return Source(_vae_key(key, config))
    if (family, component) in OPEN_CLIP:
        return _open_clip_key(key)
    # Hugging Face CLIP in both layouts; transformers >= 5.6 flattens CLIPTextModel's `text_model.`.
    return Source(key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}")


# --- UNet ------------------------------------------------------------------------------------
# The UNet's names are shared with the engine, which reads kohya LoRAs named this way
# (engine/lora/ldm_names.py; pure Python, so export may import it).


def _unet_key(key: str, config: dict) -> str:
    return ldm_unet_key(key, UnetBlocks.from_config(config))


# --- VAE -------------------------------------------------------------------------------------

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def _vae_key(key: str, config: dict) -> str:
    n_up = len(config["up_block_types"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_vae_resnet(m[3])}"  # ldm counts up from the bottom
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_vae_resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\..+|(post_)?quant_conv\..+", key):
        return key
    raise KeyError(f"VAE weight {key} has no place in the original layout")


# --- OpenCLIP text encoders ------------------------------------------------------------------

_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _open_clip_key(key: str) -> Source:
    key = key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    if key in fixed:
        return Source(fixed[key])
    if key == "text_projection.weight":
        return Source("text_projection", transpose=True)
    if m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
        return Source(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", part="qkv".index(m[2]))
    layer_part = r"(layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2|self_attn\.out_proj)"
    if m := re.fullmatch(rf"text_model\.encoder\.layers\.(\d+)\.{layer_part}\.(.+)", key):
        return Source(f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[m[2]]}.{m[3]}")
    raise KeyError(f"text encoder weight {key} has no place in OpenCLIP's layout")
