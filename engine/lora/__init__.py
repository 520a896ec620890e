"""LoRA files for a package, without torch: read either layout, match to the package's weights, store.

    read_safetensors (safetensors_file.py)  the file's tensors, every size checked
    parse_lora (layouts.py)                 kohya / diffusers / PEFT keys -> (component, module, down, up, alpha)
    match_lora (apply.py)                   -> the package's initializers, shapes checked; `.deltas(scale)`
    add_lora / list_loras / remove_lora / load_lora (store.py)   `<package>/loras/`, `loras.json`
"""

from engine.lora.apply import MAX_SCALE, MIN_SCALE, MatchedLora, check_scale, match_lora, package_targets
from engine.lora.errors import LoraError, LoraFileError, LoraMismatchError, LoraNotFoundError, LoraScaleError
from engine.lora.store import StoredLora, add_lora, list_loras, load_lora, remove_lora

__all__ = [
    "MAX_SCALE", "MIN_SCALE", "MatchedLora", "check_scale", "match_lora", "package_targets",
    "LoraError", "LoraFileError", "LoraMismatchError", "LoraNotFoundError", "LoraScaleError",
    "StoredLora", "add_lora", "list_loras", "load_lora", "remove_lora",
]  # fmt: skip
