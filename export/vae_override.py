"""`--vae`: export a checkpoint with another VAE, as users swap in fine-tuned decoders.

The override is a .safetensors file, in the original layout (`encoder.down.0.block.0...`, as
`vae-ft-mse-840000-ema-pruned.safetensors` ships; with or without a `first_stage_model.` prefix) or
in diffusers' (`encoder.down_blocks.0.resnets.0...`), or a diffusers folder: a VAE folder
(config.json + weights) or a checkpoint folder with a `vae/` subfolder. A file takes the
checkpoint's own VAE config (scaling factor included); a folder brings its own. Its hashes join the
package's source hashes, so a changed or different VAE rebuilds the package.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.errors import CheckpointError
from export.checkpoint import WEIGHT_SUFFIXES, sha256_file
from export.safetensors_header import read_header


def _vae_folder(path: Path) -> Path | None:
    for folder in (path / "vae", path):
        if (folder / "config.json").is_file():
            return folder
    return None


def vae_hashes(path: Path) -> dict[str, str]:
    """`vae/<name>` -> sha256 of the override's files, checking that it is a VAE at all."""
    path = Path(path)
    if path.is_dir():
        folder = _vae_folder(path)
        if folder is None:
            raise CheckpointError(f"--vae {path} has no config.json (nor vae/config.json): not a diffusers VAE folder")
        config = json.loads((folder / "config.json").read_text())
        if config.get("_class_name") != "AutoencoderKL":
            raise CheckpointError(f"--vae {folder} is a {config.get('_class_name')}, not an AutoencoderKL")
        files = [folder / "config.json", *sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)]
        if len(files) == 1:
            raise CheckpointError(f"--vae {folder} has no weights (*.safetensors or *.bin)")
        return {f"vae-override/{p.name}": sha256_file(p) for p in files}
    keys = read_header(path).keys()  # refuses pickles, truncated files and lying headers by name
    if _layout(keys, path) is None:
        raise CheckpointError(f"--vae {path} holds no VAE weights (no encoder.*/decoder.* keys)")
    return {f"vae-override/{path.name}": sha256_file(path)}


def _layout(keys, path: Path) -> tuple[str, str] | None:
    """(layout, prefix) of the VAE tensors in a file: ("original" | "diffusers", key prefix)."""
    for prefix in ("first_stage_model.", "vae.", ""):
        if any(k.startswith(prefix + "encoder.down_blocks.") for k in keys):
            return "diffusers", prefix
        if any(k.startswith(prefix + "encoder.down.") for k in keys):
            return "original", prefix
    return None


def load_vae_override(path: Path, vae_config_dir: Path):
    """The AutoencoderKL of `path` (file: shaped by the checkpoint's `vae_config_dir`/config.json)."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        return AutoencoderKL.from_pretrained(str(_vae_folder(path)))
    from safetensors import safe_open

    from export.single_file import load_original_weights

    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(vae_config_dir)))
    with safe_open(str(path), framework="pt") as reader:
        keys = set(reader.keys())
        layout, prefix = _layout(keys, path)
        if layout == "original":
            load_original_weights(vae, reader, keys, "sd1", "vae", prefix, f"--vae {path.name}")
        else:
            state = {k[len(prefix):]: reader.get_tensor(k) for k in keys if k.startswith(prefix)}
            expected = vae.state_dict()
            wrong = [k for k in expected if k not in state or tuple(state[k].shape) != tuple(expected[k].shape)]
            if wrong:
                raise CheckpointError(
                    f"--vae {path.name} does not fit the checkpoint's VAE config: {len(wrong)} weights missing or "
                    f"of another shape (e.g. {', '.join(wrong[:3])})"
                )
            vae.load_state_dict({k: state[k].float() for k in expected})
    return vae.eval()
