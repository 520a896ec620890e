"""LoRA files for a package, without torch: read either layout, match to the package's weights, store.

    read_safetensors (safetensors_file.py)  the file's tensors, every size checked
    parse_lora (layouts.py)                 kohya / diffusers / PEFT keys -> (component, module, down, up, alpha)
    match_lora (apply.py)                   -> the package's initializers, shapes checked; `.deltas(scale)`
    add_lora / list_loras / remove_lora / load_lora (store.py)   `<package>/loras/`, `loras.json`
    take_lora_tags (prompt_tags.py)         `<lora:NAME:SCALE>` out of a prompt (no numpy: the front end uses it)
    LoraLibrary (variants.py)               a worker's LoRAs: the weights a set of (name, scale) changes
"""

from __future__ import annotations

import importlib

# Loaded on first use (PEP 562), so that `engine.lora.prompt_tags`, which engine/request.py and
# the front end import, does not bring numpy and the file readers along.
_WHERE = {
    "MAX_SCALE": "apply", "MIN_SCALE": "apply", "MatchedLora": "apply", "check_scale": "apply",
    "match_lora": "apply", "package_targets": "apply",
    "LoraError": "errors", "LoraFileError": "errors", "LoraMismatchError": "errors",
    "LoraNotFoundError": "errors", "LoraScaleError": "errors",
    "StoredLora": "store", "add_lora": "store", "list_loras": "store", "load_lora": "store", "remove_lora": "store",
    "LoraLibrary": "variants", "Variant": "variants",
    "take_lora_tags": "prompt_tags",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'engine.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(f"engine.lora.{_WHERE[name]}"), name)
