"""UNet weight names in the original (CompVis / Stability "ldm") layout, from diffusers' names.

The original `openaimodel` UNet numbers its blocks flat: `input_blocks.N` (conv_in, then per
down level `layers_per_block` resnet[+attention] blocks and a downsampler), `middle_block.0/1/2`
(resnet, attention, resnet), `output_blocks.N` (per up level `layers_per_block + 1` blocks, the
last with the upsampler), and renames the resnets' layers (`conv1` -> `in_layers.2`, ...).
Inside an attention block (`proj_in`, `transformer_blocks.0.attn1.to_q`, ...) the names agree.

Two readers need this mapping, and share this one module so that they cannot disagree:
export/ldm_layout.py (single-file checkpoints, driven by the UNet's config.json) and
engine/lora/apply.py (kohya sd-scripts SDXL LoRAs, which name modules this way:
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which has only a package's
parameter names and so derives the block layout from them. The mapping is the one diffusers'
`convert_ldm_unet_checkpoint` applies. Pure Python: the engine imports it without torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop/pooled-text embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class UnetBlocks:
    """What the flat ldm numbering depends on: resnets per down level, and which up levels attend."""

    layers_per_block: int
    up_with_attention: frozenset[int]  # diffusers up_blocks indices that hold attentions

    @classmethod
    def from_config(cls, config: dict) -> UnetBlocks:
        """From a diffusers UNet config.json."""
        lpb = config.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise ValueError(f"a UNet with per-block layer counts ({lpb}) has no original single-file layout")
        with_attention = {i for i, kind in enumerate(config["up_block_types"]) if "CrossAttn" in kind}
        return cls(lpb, frozenset(with_attention))

    @classmethod
    def from_param_names(cls, names: Iterable[str]) -> UnetBlocks | None:
        """From a UNet's parameter names (a package has no config.json); None without one flat layout."""
        resnets: dict[int, set[int]] = {}
        with_attention = set()
        for name in names:
            if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.", name):
                resnets.setdefault(int(m[1]), set()).add(int(m[2]))
            elif m := re.match(r"up_blocks\.(\d+)\.attentions\.", name):
                with_attention.add(int(m[1]))
        counts = {len(layers) for layers in resnets.values()}
        if len(counts) != 1:  # no down blocks, or per-level counts the ldm numbering cannot express
            return None
        return cls(counts.pop(), frozenset(with_attention))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def ldm_unet_key(key: str, blocks: UnetBlocks) -> str:
    """The original-layout name of diffusers UNet parameter `key`; KeyError if it has none."""
    lpb = blocks.layers_per_block
    stem, _, leaf = key.rpartition(".")
    if stem in _UNET_TOP:
        return f"{_UNET_TOP[stem]}.{leaf}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = 1 + block * (lpb + 1) + layer  # input_blocks.0 is conv_in; each level ends with its downsampler
        return f"input_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * (lpb + 1) + lpb}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        i = block * (lpb + 1) + layer  # up blocks hold lpb + 1 layers
        return f"output_blocks.{i}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        # The upsampler follows the level's last layer: after its attention where it has one.
        return f"output_blocks.{block * (lpb + 1) + lpb}.{2 if block in blocks.up_with_attention else 1}.conv.{m[2]}"
    raise KeyError(f"UNet weight {key} has no place in the original layout")


def ldm_unet_names(params: Iterable[str]) -> dict[str, str]:
    """original-layout name -> diffusers name, for those of a UNet's `params` that have one.

    Empty when the names give no single layers-per-level count (no ldm layout to speak of)."""
    params = list(params)
    blocks = UnetBlocks.from_param_names(params)
    if blocks is None:
        return {}
    out = {}
    for param in params:
        try:
            out[ldm_unet_key(param, blocks)] = param
        except KeyError:
            continue  # a weight the original layout has no name for: only its diffusers name matches
    return out
