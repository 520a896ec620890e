"""A LoRA file's keys, in either common layout, as one list of (component, module, down, up, alpha).

kohya / A1111 (sd-scripts):   lora_unet_<module with _ for .>.lora_down.weight / .lora_up.weight / .alpha
                              lora_te_ (SD 1.x/2.x), lora_te1_ / lora_te2_ (SDXL's two text encoders)
diffusers / PEFT:             unet.<module>.lora_A.weight / .lora_B.weight  (text_encoder., text_encoder_2.)
                              alpha: `<prefix>.<module>.alpha` tensors, or the `lora_adapter_metadata`
                              JSON diffusers writes into the header (`unet.lora_alpha`, `unet.alpha_pattern`)
older diffusers:              unet.<...>.processor.to_q_lora.down.weight / .up.weight,
                              text_encoder.<...>.lora_linear_layer.down.weight / .up.weight

A kohya key spells the module with `_` for `.`, which is ambiguous (`down_blocks_0` vs
`down_blocks.0`); it is resolved against the package's own parameter names (engine/lora/apply.py).
kohya's SDXL LoRAs name UNet modules in the original (ldm) layout instead
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `lora_unet_out_2`); apply.py resolves
those too, through engine/lora/ldm_names.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from engine.lora.errors import LoraMismatchError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
DIFFUSERS_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".down.weight": "down", ".up.weight": "up",  # the processor form: ...processor.to_q_lora.down.weight
    ".alpha": "alpha",
}  # fmt: skip
# Older diffusers attention-processor LoRAs name the projection's LoRA, not the projection.
PROCESSOR_NAMES = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}


@dataclass(frozen=True)
class LoraPair:
    """One adapted weight: delta = scale * alpha / rank * up @ down.

    `module` is the diffusers / transformers module name (`down_blocks.0.attentions.0.proj_in`);
    for a kohya key it is the `_`-spelled name until resolved. `keys` are the file's keys, for errors.
    """

    component: str
    module: str
    kohya: bool
    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: alpha = rank (scale 1)
    down_key: str
    up_key: str
    keys: tuple[str, ...]  # every key of the file this pair uses (down, up, alpha)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class ParsedLora:
    layout: str  # "kohya" | "diffusers"
    pairs: list[LoraPair]
    unused: list[str]  # keys of the file that are not part of any down/up pair


def _split(key: str, suffixes: dict[str, str]) -> tuple[str, str] | None:
    for suffix, part in suffixes.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _metadata_alphas(metadata: dict[str, str]) -> dict:
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _metadata_alpha(meta: dict, component: str, module: str) -> float | None:
    pattern = meta.get(f"{component}.alpha_pattern") or {}
    for name, alpha in pattern.items():  # PEFT matches a pattern key against the end of the module name
        if module == name or module.endswith("." + name) or re.fullmatch(f"(.*\\.)?{name}", module):
            return float(alpha)
    alpha = meta.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else None


def _diffusers_module(rest: str) -> str:
    parts = rest.split(".")
    if parts[-1] in PROCESSOR_NAMES:
        parts = [p for p in parts[:-1] if p != "processor"] + [PROCESSOR_NAMES[parts[-1]]]
    return ".".join(parts)


def parse_lora(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> ParsedLora:
    """Group a LoRA file's tensors into pairs; keys of neither layout are returned as `unused`."""
    kohya = any(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors)
    groups: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    unused = []
    for key, array in tensors.items():
        found = None
        if kohya:
            for prefix, component in KOHYA_PREFIXES.items():
                split = _split(key, KOHYA_SUFFIXES) if key.startswith(prefix) else None
                if split:
                    found = (component, split[0][len(prefix) :], split[1])
                    break
        else:
            head, _, rest = key.partition(".")
            split = _split(rest, DIFFUSERS_SUFFIXES) if head in COMPONENTS else None
            if split:
                found = (head, _diffusers_module(split[0]), split[1])
        if found is None:
            unused.append(key)
            continue
        component, module, part = found
        groups.setdefault((component, module), {})[part] = (key, array)
    meta = _metadata_alphas(metadata)
    pairs = []
    for (component, module), parts in groups.items():
        if "down" not in parts or "up" not in parts:
            unused.extend(key for key, _ in parts.values())
            continue
        alpha = None
        if "alpha" in parts:
            value = parts["alpha"][1]
            if value.size != 1:
                raise LoraMismatchError(f"{parts['alpha'][0]} should hold one number, it has shape {list(value.shape)}")
            alpha = float(value.reshape(()))
        elif not kohya:
            alpha = _metadata_alpha(meta, component, module)
        pairs.append(
            LoraPair(
                component, module, kohya, parts["down"][1], parts["up"][1], alpha,
                parts["down"][0], parts["up"][0], tuple(sorted(key for key, _ in parts.values())),
            )
        )  # fmt: skip
    return ParsedLora("kohya" if kohya else "diffusers", pairs, sorted(unused))
