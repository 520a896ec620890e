"""A single-file checkpoint (`model.safetensors`) as the export's source: configs, hashes, weights.

Nothing is downloaded. The file's family (export/families.py) picks the architecture's diffusers
configs from `export/architectures/<sd15|sd21|sdxl>` and CLIP's BPE vocabulary from
`export/assets/clip_bpe`; `--config DIR` takes them from a diffusers folder instead (a model of
another shape, or the tiny test models). Both become one config folder in diffusers' layout
(model_index.json, */config.json, scheduler, tokenizers), which the rest of the export reads as
it reads a checkpoint folder. The weights are read from the file by name
(export/ldm_layout.py) into models built from those configs; a missing weight or a shape that
does not fit is refused naming it.

What the weights cannot say is asked for: an SD 2.x file does not say whether it predicts epsilon
(2.x base, trained at 512) or v (2.x 768-v), so `--prediction-type` and `--default-size` must be
given for it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError
from export.checkpoint import FAMILIES, CheckpointInfo, sha256_file
from export.families import Detected, detect_family
from export.ldm_layout import component_prefix, original_key
from export.random_checkpoint import clip_tokenizer_files
from export.safetensors_header import read_header

log = logging.getLogger(__name__)

ARCHITECTURES = Path(__file__).parent / "architectures"
ARCHITECTURE_OF = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
PREDICTION_TYPES = ("epsilon", "v_prediction")
SIDES = range(256, 2049, 64)  # --default-size: what the UNet's sample_size can say (x8)
SD2_HINT = (
    "--prediction-type v_prediction --default-size 768 for SD 2.x 768-v models (stable-diffusion-2[-1] and "
    "their fine-tunes), --prediction-type epsilon --default-size 512 for SD 2.x base models"
)


@dataclass(frozen=True)
class SingleFileOptions:
    """What a single file cannot say itself; None: the file's family (or --config) decides."""

    config: Path | None = None  # a diffusers folder whose configs and tokenizers to use
    prediction_type: str | None = None  # "epsilon" | "v_prediction"
    default_size: int | None = None  # native side in pixels, e.g. 512 or 768

    def __post_init__(self):
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise CheckpointError(
                f"--prediction-type must be epsilon or v_prediction, not {self.prediction_type!r}"
            )
        if self.default_size is not None and self.default_size not in SIDES:
            raise CheckpointError(
                f"--default-size must be a side in pixels, a multiple of 64 from 256 to 2048 (512, 768, 1024), "
                f"not {self.default_size}"
            )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.config, self.prediction_type, self.default_size))


@dataclass(frozen=True)
class SingleFile:
    """A checked single file and the config folder made for it."""

    file: Path
    detected: Detected
    info: CheckpointInfo  # path: the config folder; file_hashes: the file's and every config's


def _model_index(detected: Detected) -> dict:
    base = {
        "scheduler": ["diffusers", None],  # filled from the scheduler config
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if detected.family == "sdxl":
        cls = "StableDiffusionXLInpaintPipeline" if detected.inpaint else "StableDiffusionXLPipeline"
        extra = {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": True,
            **({"requires_aesthetics_score": False} if detected.inpaint else {}),
        }
    else:
        cls = "StableDiffusionInpaintPipeline" if detected.inpaint else "StableDiffusionPipeline"
        extra = {"safety_checker": [None, None], "requires_safety_checker": False}
    return {"_class_name": cls, **base, **extra}


def _tokenizer_files(dest: Path, pad_token: str) -> None:
    """CLIP's tokenizer as transformers reads it: BPE files + tokenizer_config.json."""
    clip_tokenizer_files(dest)
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }, indent=1, sort_keys=True))  # fmt: skip


def _from_architecture(detected: Detected, dest: Path) -> None:
    """export/architectures/<family> + the repo's CLIP vocabulary -> a diffusers config folder."""
    arch = ARCHITECTURES / ARCHITECTURE_OF[detected.family]
    index = _model_index(detected)
    for folder in sorted(p.name for p in arch.iterdir() if p.is_dir()):
        config = json.loads((arch / folder / "config.json").read_text())
        if folder == "scheduler":
            index["scheduler"][1] = config["_class_name"]
            (dest / folder).mkdir(parents=True)
            (dest / folder / "scheduler_config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
            continue
        if folder == "unet" and detected.inpaint:
            config["in_channels"] = 2 * int(config.get("out_channels", 4)) + 1
        (dest / folder).mkdir(parents=True)
        (dest / folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    # SD 1.x pads prompts with the end-of-text token; OpenCLIP encoders (SD 2.x, SDXL's second) with "!".
    _tokenizer_files(dest / "tokenizer", "!" if detected.family == "sd2" else "<|endoftext|>")
    if detected.family == "sdxl":
        _tokenizer_files(dest / "tokenizer_2", "!")
    (dest / "model_index.json").write_text(json.dumps(index, indent=1, sort_keys=True))


def _from_config_folder(source: Path, detected: Detected, name: str, dest: Path) -> None:
    """--config DIR: copy a diffusers folder's configs and tokenizers (not its weights), checked against the file."""
    index_file = source / "model_index.json"
    if not index_file.is_file():
        raise CheckpointError(f"--config {source} has no model_index.json: give a diffusers checkpoint folder")
    index = json.loads(index_file.read_text())
    cls = index.get("_class_name", "<none>")
    folder_family = FAMILIES.get(cls)
    if folder_family is None:
        raise CheckpointError(f"--config {source} is a {cls}, not a Stable Diffusion 1.x/2.x or SDXL pipeline")
    if (folder_family == "sdxl") != (detected.family == "sdxl"):
        raise CheckpointError(f"{name} is an {detected.description} checkpoint but --config {source} is a {cls}")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.is_dir() and entry.name in index:
            for file in sorted(entry.glob("*.json")) + sorted(entry.glob("*.txt")):
                if file.name.endswith(".index.json"):  # a sharded weights index: weights are the file's
                    continue
                (dest / entry.name).mkdir(exist_ok=True)
                shutil.copyfile(file, dest / entry.name / file.name)
    for file in ("model_index.json", "kiln.json"):
        if (source / file).is_file():
            shutil.copyfile(source / file, dest / file)
    unet = json.loads((dest / "unet" / "config.json").read_text())
    if (int(unet.get("in_channels", 4)) == 9) != detected.inpaint:
        raise CheckpointError(
            f"{name} is an {detected.description} checkpoint but the UNet of --config {source} takes "
            f"{unet.get('in_channels')} input channels"
        )
    for tok in ("tokenizer", "tokenizer_2"):
        if tok in index and not (dest / tok / "vocab.json").is_file():
            _tokenizer_files(dest / tok, "!" if tok == "tokenizer_2" or detected.family == "sd2" else "<|endoftext|>")


def _apply_options(dest: Path, detected: Detected, options: SingleFileOptions, name: str) -> None:
    """Write --prediction-type into the scheduler config and --default-size into the UNet's sample_size."""
    if detected.family == "sd2" and options.config is None:
        missing = [flag for flag, value in (("--prediction-type", options.prediction_type),
                                            ("--default-size", options.default_size)) if value is None]  # fmt: skip
        if missing:
            raise CheckpointError(
                f"{name} is an {detected.description} checkpoint, and its weights do not say whether it predicts "
                f"epsilon or v nor at which size it was trained: pass {' and '.join(missing)} ({SD2_HINT})"
            )
    if options.prediction_type is not None:
        path = dest / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(path.read_text())
        scheduler["prediction_type"] = options.prediction_type
        path.write_text(json.dumps(scheduler, indent=1, sort_keys=True))
    if options.default_size is not None:
        if detected.family == "sdxl" and options.default_size != 1024:
            raise CheckpointError(f"--default-size {options.default_size}: SDXL packages default to 1024, their native size")
        path = dest / "unet" / "config.json"
        unet = json.loads(path.read_text())
        unet["sample_size"] = options.default_size // 8
        path.write_text(json.dumps(unet, indent=1, sort_keys=True))


def prepare_single_file(file: Path, options: SingleFileOptions, workdir: Path) -> SingleFile:
    """Check `file`, detect its family and write its config folder under `workdir`; hash everything.

    Reads only the file's header (and hashes its bytes): a file that cannot be exported is refused
    before any weight is loaded.
    """
    file = Path(file)
    tensors = read_header(file)
    detected = detect_family(tensors, file.name)
    dest = Path(workdir) / "config"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if options.config is not None:
        _from_config_folder(Path(options.config), detected, file.name, dest)
    else:
        _from_architecture(detected, dest)
    _apply_options(dest, detected, options, file.name)

    index = json.loads((dest / "model_index.json").read_text())
    is_xl = detected.family == "sdxl"
    components = ("text_encoder", "text_encoder_2", "unet", "vae") if is_xl else ("text_encoder", "unet", "vae")
    tokenizers = ("tokenizer", "tokenizer_2") if is_xl else ("tokenizer",)
    missing = [c for c in (*components, *tokenizers, "scheduler") if c not in index or not (dest / c).is_dir()]
    if missing:
        raise CheckpointError(f"the configs for {file.name} lack {', '.join(missing)}")
    hashes = {file.name: sha256_file(file)}
    for path in sorted(p for p in dest.rglob("*") if p.is_file()):
        hashes[f"config/{path.relative_to(dest)}"] = sha256_file(path)
    scheduler = json.loads((dest / "scheduler" / "scheduler_config.json").read_text())
    prediction_type = scheduler.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise CheckpointError(f"the scheduler config's prediction_type {prediction_type!r} is not supported")
    info = CheckpointInfo(dest, detected.family, prediction_type, components, tokenizers, hashes)
    return SingleFile(file, detected, info)


# --- weights ---------------------------------------------------------------------------------


def _build_model(config_dir: Path, component: str):
    """An untrained model of `component`'s class (model_index.json) from its config."""
    import importlib

    library, cls_name = json.loads((config_dir / "model_index.json").read_text())[component]
    cls = getattr(importlib.import_module(library), cls_name)
    if library == "transformers":
        return cls(cls.config_class.from_pretrained(config_dir / component))
    return cls.from_config(cls.load_config(config_dir / component))


def load_original_weights(model, reader, keys: set[str], family: str, component: str, prefix: str, name: str) -> None:
    """Fill `model`'s parameters from the original-layout tensors under `prefix` in `reader` (safe_open).

    Every parameter must be found with its shape (up to trailing 1s); tensors of the file that the
    model does not use (EMA copies, SD 2.x's unused last text layer, position ids) are left.
    """
    import torch

    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    state, missing, used = {}, [], set()
    for key, param in model.named_parameters():
        try:
            source = original_key(family, component, key, config)
        except KeyError as e:
            raise CheckpointError(f"{name}: {e.args[0]}") from None
        full = prefix + source.key
        if full not in keys:
            missing.append(full)
            continue
        used.add(full)
        tensor = reader.get_tensor(full)
        if source.transpose:
            tensor = tensor.T
        if source.part is not None:
            tensor = tensor.chunk(3, dim=0)[source.part]
        if tuple(tensor.shape) != tuple(param.shape):
            squeeze = [d for d in tensor.shape if d != 1] == [d for d in param.shape if d != 1]
            if not squeeze or tensor.numel() != param.numel():
                raise CheckpointError(
                    f"{name}: {full} is {list(tensor.shape)}, but the {component} its configs describe wants "
                    f"{list(param.shape)} for {key}: a model of another shape; pass --config with its diffusers configs"
                )
            tensor = tensor.reshape(param.shape)  # ldm's 1x1 convolutions where diffusers has Linear layers
        state[key] = tensor.to(torch.float32).contiguous()
    if missing:
        raise CheckpointError(
            f"{name} lacks {len(missing)} of the {component}'s weights (e.g. {', '.join(missing[:3])}): "
            f"not a complete {component}, or a model of another shape; pass --config with its diffusers configs"
        )
    result = model.load_state_dict(state, strict=False)
    buffers = {k for k, _ in model.named_buffers()}
    if set(result.missing_keys) - buffers or result.unexpected_keys:
        raise CheckpointError(f"{name}: the {component}'s weights did not load ({result})")
    unused = [k for k in keys if k.startswith(prefix) and k not in used]
    if unused:
        log.info("%s: %d %s tensors unused (e.g. %s)", name, len(unused), component, ", ".join(sorted(unused)[:2]))
    model.eval()


def load_single_file_pipeline(single: SingleFile, skip_vae: bool = False):
    """The diffusers pipeline of `single`: its configs' models, the file's weights (the VAE left
    untrained when `skip_vae`: an override replaces it)."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    config_dir = single.info.path
    if not single.detected.has_vae and not skip_vae:
        raise CheckpointError(
            f"{single.file.name} has no VAE (no first_stage_model.* keys): pass --vae with the VAE it was made for"
        )
    models = {}
    with safe_open(str(single.file), framework="pt") as reader:
        keys = set(reader.keys())
        for component in single.info.components:
            model = _build_model(config_dir, component)
            if component != "vae" or not skip_vae:
                prefix = component_prefix(single.detected.family, component)
                load_original_weights(model, reader, keys, single.detected.family, component, prefix, single.file.name)
            models[component] = model
    try:
        return DiffusionPipeline.from_pretrained(str(config_dir), **models)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"diffusers could not assemble {single.file.name} from {config_dir}: {e}") from None
