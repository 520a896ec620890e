"""Write a diffusers checkpoint folder as one original-layout file (`model.safetensors`).

The inverse of what export/single_file.py reads, through the same key mapping
(export/ldm_layout.py): the tests make single files of the tiny test checkpoints with it, so that a
single file and the folder it came from can be exported and their images compared. The
diffusers repository's `scripts/convert_diffusers_to_original_stable_diffusion.py` does this job
too, but it is a script of the repository, not part of the installed package.

    python -m export.single_file_writer build/checkpoints/sd15-random build/sd15-random.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from export.checkpoint import inspect_checkpoint
from export.ldm_layout import component_prefix, original_key

log = logging.getLogger(__name__)


def _component_state(folder: Path) -> dict:
    """Every tensor of one diffusers component folder (all its .safetensors shards)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def original_state(family: str, component: str, state: dict, config: dict, prefix: str | None = None) -> dict:
    """One component's diffusers `state` in the original layout, keys under `prefix` (default: the family's)."""
    import torch

    prefix = component_prefix(family, component) if prefix is None else prefix
    out: dict = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):  # a buffer, rebuilt by the model
            continue
        source = original_key(family, component, key, config)
        if source.transpose:
            tensor = tensor.T
        if source.part is not None:
            fused.setdefault(prefix + source.key, {})[source.part] = tensor
            continue
        if component == "vae" and ".mid.attn_1." in source.key and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # ldm's VAE attention projections are 1x1 convolutions
        out[prefix + source.key] = tensor.contiguous()
    for key, parts in fused.items():
        out[key] = torch.cat([parts[0], parts[1], parts[2]], dim=0).contiguous()  # OpenCLIP's in_proj: q, k, v
    return out


def original_vae_state(vae_folder: Path, prefix: str = "") -> dict:
    """A diffusers VAE folder (config.json + weights) as an original-layout VAE file's tensors."""
    config = json.loads((vae_folder / "config.json").read_text())
    return original_state("sd1", "vae", _component_state(vae_folder), config, prefix)


def single_file_state(checkpoint: Path, vae_from: Path | None = None) -> dict:
    """All of `checkpoint`'s weights in the original single-file layout; the VAE from `vae_from` if given."""
    info = inspect_checkpoint(checkpoint)
    out: dict = {}
    for component in info.components:
        folder = (vae_from if component == "vae" and vae_from else checkpoint / component)
        config = json.loads((folder / "config.json").read_text())
        out.update(original_state(info.family, component, _component_state(folder), config))
    return out


def write_single_file(checkpoint: Path, out: Path, vae_from: Path | None = None) -> Path:
    """Write `checkpoint` (a diffusers folder) as the original-layout .safetensors file `out`."""
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(single_file_state(Path(checkpoint), vae_from), str(out))
    log.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="diffusers checkpoint folder")
    parser.add_argument("out", type=Path, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_single_file(args.checkpoint, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
