"""Inspect a local diffusers checkpoint folder: which family it is, and what its files hash to.

Only Stable Diffusion 1.x, 2.x (epsilon or v-prediction) and SDXL layouts are exported, their
inpainting checkpoints (a 9-channel UNet) included; anything else is refused with a message that
says what was found, before any weight is loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

# model_index.json pipeline class -> Kiln model family.
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    family: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    components: tuple[str, ...]  # text_encoder, [text_encoder_2,] unet, vae
    tokenizers: tuple[str, ...]  # tokenizer, [tokenizer_2]
    file_hashes: dict[str, str]  # relative path -> sha256 of every config and weight file

    @property
    def digest(self) -> str:
        """One hash over every file's hash: equal digests mean an unchanged checkpoint."""
        h = hashlib.sha256()
        for name in sorted(self.file_hashes):
            h.update(f"{name}\0{self.file_hashes[name]}\n".encode())
        return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: not a complete diffusers checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): the checkpoint is corrupt") from None


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Classify the checkpoint at `path` and hash its files; raise CheckpointError if unusable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist or is not a folder")
    index = _read_json(path / "model_index.json")
    pipeline_class = index.get("_class_name", "<none>")
    if pipeline_class not in FAMILIES:
        raise CheckpointError(
            f"{path} is a {pipeline_class}; Kiln exports StableDiffusionPipeline (SD 1.x/2.x) "
            f"and StableDiffusionXLPipeline (SDXL) checkpoints and their Inpaint variants only"
        )
    is_xl = FAMILIES[pipeline_class] == "sdxl"
    components = ("text_encoder", "text_encoder_2", "unet", "vae") if is_xl else ("text_encoder", "unet", "vae")
    tokenizers = ("tokenizer", "tokenizer_2") if is_xl else ("tokenizer",)

    hashes: dict[str, str] = {}
    for name in components:
        folder = path / name
        _read_json(folder / "config.json")
        weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES) if folder.is_dir() else []
        if not weights:
            raise CheckpointError(f"{folder} has no weights (*.safetensors or *.bin)")
        for file in [folder / "config.json", *weights]:
            hashes[str(file.relative_to(path))] = sha256_file(file)
    for name in tokenizers:
        folder = path / name
        files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
        if not files:
            raise CheckpointError(f"{folder} is missing: the checkpoint has no tokenizer files")
        for file in files:
            hashes[str(file.relative_to(path))] = sha256_file(file)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file)
    hashes[str(scheduler_file.relative_to(path))] = sha256_file(scheduler_file)
    hashes["model_index.json"] = sha256_file(path / "model_index.json")
    if (path / "kiln.json").is_file():  # serving hints (export/package.py) change the package too
        hashes["kiln.json"] = sha256_file(path / "kiln.json")

    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{scheduler_file}: prediction_type {prediction_type!r} is not supported")
    if is_xl:
        family = "sdxl"
    else:
        text_config = _read_json(path / "text_encoder" / "config.json")
        # SD 2.x uses OpenCLIP (GELU, 1024 wide); SD 1.x uses OpenAI CLIP (quick GELU).
        family = "sd2" if text_config.get("hidden_act") == "gelu" else "sd1"
    return CheckpointInfo(path, family, prediction_type, components, tokenizers, hashes)
