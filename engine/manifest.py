"""The model package's `manifest.json`: the contract between export and engine.

The exporter writes it and the engine refuses any package whose manifest it cannot honour
(another format version, a provider that is not installed, missing or altered files), saying why.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from engine.errors import IncompatiblePackageError, PackageError

# Bump when the engine can no longer run packages written by older exporters.
# 2: every package has a vae_encoder component (img2img, inpainting) and the UNet's input channels.
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"


class TensorSpec(msgspec.Struct, frozen=True):
    name: str
    dtype: str  # numpy dtype name: float32, float16, int32, int64
    shape: list[int | str]  # str entries are dynamic axes ("batch", "height", ...)


class Component(msgspec.Struct, frozen=True):
    file: str  # relative to the package folder
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weights_file: str | None = None  # external data holding the initializers, if any


class TokenizerSpec(msgspec.Struct, frozen=True):
    folder: str  # holds tokenizer.json
    max_length: int
    pad_id: int


class SizeLimits(msgspec.Struct, frozen=True):
    min_side: int
    max_side: int
    multiple_of: int
    default: str  # "WxH"
    native: str  # what the checkpoint was trained at
    # Larger requests are drawn at this many pixels on the longer side and upscaled: for models
    # whose attention at full size would not fit in memory or that never saw such latents.
    render_max_side: int | None = None


class Defaults(msgspec.Struct, frozen=True):
    sampler: str
    steps: int
    guidance_scale: float
    guidance_rescale: float = 0.0


class Manifest(msgspec.Struct, frozen=True):
    format_version: int
    name: str
    family: str  # sd1 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    target: str  # cpu | cuda | tensorrt
    precision: str  # fp32 | fp16
    opset: int
    components: dict[str, Component]  # text_encoder[, text_encoder_2], unet, vae_encoder, vae_decoder
    tokenizers: list[TokenizerSpec]
    scheduler_config: dict
    vae_scaling_factor: float
    latent_channels: int
    vae_scale_factor: int  # pixels per latent along each side
    sizes: SizeLimits
    defaults: Defaults
    source_digest: str  # sha256 over the checkpoint's file hashes
    source_files: dict[str, str]  # relative path -> sha256
    tools: dict[str, str]  # versions of what made the package
    force_zeros_for_empty_prompt: bool = False  # SDXL: empty negative prompt -> zero embeddings
    # What the UNet's `sample` takes: latent_channels, or 9 for an inpainting UNet (noisy latents,
    # the mask at latent size, the masked image's latents, concatenated on the channel axis).
    unet_in_channels: int = 4
    # Per-channel latent statistics of VAEs whose config has them (latents_mean / latents_std):
    # diffusers then encodes as (latents - mean) * scaling_factor / std and decodes the inverse.
    # None: plain latents * scaling_factor.
    vae_latents_mean: list[float] | None = None
    vae_latents_std: list[float] | None = None
    source_path: str | None = None  # the checkpoint folder it was exported from, to name in messages
    extra: dict = {}


def write_manifest(folder: Path, manifest: Manifest) -> None:
    (Path(folder) / MANIFEST_NAME).write_bytes(msgspec.json.format(msgspec.json.encode(manifest), indent=2))


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise PackageError(f"{folder} is not a model package: {MANIFEST_NAME} is missing (run `kiln export`)")
    try:
        raw = msgspec.json.decode(path.read_bytes())
    except msgspec.DecodeError as e:
        raise PackageError(f"{path} is not valid JSON: {e}") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version > FORMAT_VERSION:
            fix = "update Kiln to one that reads it, or re-export the checkpoint with this one: "
        else:
            fix = "re-export it with this version of Kiln: "
        raise IncompatiblePackageError(
            f"{folder} has package format {version}, this engine reads format {FORMAT_VERSION}: "
            f"{fix}`{rebuild_command(Path(folder), raw if isinstance(raw, dict) else {})}`"
        )
    try:
        return msgspec.convert(raw, Manifest)
    except msgspec.ValidationError as e:
        raise PackageError(f"{path} does not describe a valid package: {e}") from None


def rebuild_command(folder: Path, raw: dict) -> str:
    """The `kiln export` command that rebuilds the package at `folder` (<name>/<target> under an
    output root), from what its manifest, of whatever format, says about itself."""
    target = raw.get("target") if isinstance(raw.get("target"), str) else folder.name
    source = raw.get("source_path") if isinstance(raw.get("source_path"), str) else "<checkpoint folder>"
    name = raw.get("name") if isinstance(raw.get("name"), str) else folder.parent.name
    command = f"kiln export {source} --target {target} --out {folder.parent.parent}"
    if source == "<checkpoint folder>" or Path(source).name != name:
        command += f" --name {name}"
    options = raw.get("extra", {}).get("export_options", {}) if isinstance(raw.get("extra"), dict) else {}
    for option, flag in (("sizes", "--sizes"), ("batches", "--batch")):  # TensorRT's engines
        if isinstance(options, dict) and isinstance(options.get(option), list) and options[option]:
            command += f" {flag} {','.join(map(str, options[option]))}"
    return command + " --force"
