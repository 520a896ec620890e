"""Build a model package: checkpoint folder or single file -> build/<name>/<target>/ with a manifest.

Stages, each reported as it runs: inspect (hash) -> load -> ONNX export -> weights split out ->
target-specific optimisation -> tokenizers -> manifest. The package is assembled in a temporary
folder and renamed into place, so an interrupted export never leaves a half package behind; an
unchanged checkpoint (same file hashes, same target and tool versions) is reused unless forced.
A single-file checkpoint (export/single_file.py) is read into the same diffusers pipeline and goes
the same way from there; its hashes are the file's and its configs', and a `--vae` override's
hashes join either kind's.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path

from engine.errors import CheckpointError, PackageError
from engine.manifest import (
    FORMAT_VERSION,
    Component,
    Defaults,
    Manifest,
    SizeLimits,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from export.checkpoint import CheckpointInfo, inspect_checkpoint, sha256_file
from export.single_file import SingleFile, SingleFileOptions, prepare_single_file

log = logging.getLogger(__name__)

TARGETS = ("cpu", "openvino", "cuda", "tensorrt")
# Bump when a change to the export code changes what a package holds, so that packages made
# before it are rebuilt instead of reused.
# 4: the VAE encoder, unet_in_channels and the VAE latent statistics; 5: weights.json names the
# torch parameter of each renamed (MatMul) weight, for LoRAs; 6: cuda packages keep attention
# weights unpacked and every weight in weights.bin with its parameter, for LoRAs.
EXPORT_REVISION = "6"
DEFAULT_OPSET = 17
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}
# Native resolution per family: what sizes and defaults derive from.
NATIVE_SIDE = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("kiln", "torch", "diffusers", "transformers", "optimum-onnx", "onnx", "onnxruntime", "openvino"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


class Stages:
    """Prints `[k/N] stage ... done in Xs` so a long export shows where it is."""

    def __init__(self, total: int):
        self.total, self.k, self.t0 = total, 0, 0.0

    def start(self, what: str) -> None:
        self.k += 1
        self.t0 = time.perf_counter()
        log.info("[%d/%d] %s ...", self.k, self.total, what)

    def done(self, detail: str = "") -> None:
        log.info("[%d/%d] done in %.1fs %s", self.k, self.total, time.perf_counter() - self.t0, detail)


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape=shape))
    return specs


def split_weights(model_path: Path) -> Component:
    """Rewrite model.onnx with its initializers in weights.bin beside it.

    The engine maps weights.bin once and hands the same buffers to every per-resolution session,
    so specialising shapes does not multiply memory.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=True)
    for stale in model_path.parent.glob("*"):
        if stale != model_path:
            stale.unlink()
    onnx.save_model(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=1024,
    )
    folder = model_path.parent.name
    weights = model_path.parent / "weights.bin"
    _write_weights_index(model, model_path.parent / "weights.json")
    return Component(
        file=f"{folder}/model.onnx",
        sha256=sha256_file(model_path),
        inputs=_tensor_specs(model.graph.input),
        outputs=_tensor_specs(model.graph.output),
        weights_file=f"{folder}/weights.bin" if weights.exists() else None,
    )


def _renamed_weights(model) -> dict[str, tuple[str, bool]]:
    """initializer -> (torch parameter, transposed) for the weights the ONNX export renamed.

    The torch exporter stores a Linear's weight (out, in) transposed, (in, out), as the MatMul's
    second input under a generated name (`onnx::MatMul_1641`); the MatMul node keeps the module's
    scope (`/down_blocks.0/attentions.0/transformer_blocks.0/attn1/to_q/MatMul`), which names the
    parameter. LoRA deltas (engine/lora/) are addressed by parameter, so the name is recorded here.
    """
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2 or not node.name.startswith("/"):
            continue
        module = ".".join(node.name.strip("/").split("/")[:-1])
        if module:
            consumers.setdefault(node.input[1], set()).add(module)
    found = {}
    for init in model.graph.initializer:
        modules = consumers.get(init.name, set())
        if init.name.startswith("onnx::") and len(modules) == 1 and len(init.dims) == 2:
            found[init.name] = (f"{modules.pop()}.weight", True)
    return found


def _write_weights_index(model, path: Path) -> None:
    """name -> dtype, shape, offset, length of each external initializer, so the engine can map
    weights.bin without parsing protobuf (the serving install has no `onnx` package). A renamed
    weight also says which torch parameter it is (`param`) and whether it is stored transposed."""
    renamed = _renamed_weights(model)
    index = {}
    for init in model.graph.initializer:
        location = {kv.key: kv.value for kv in init.external_data}
        if "location" not in location:
            continue
        index[init.name] = {
            "dtype": ONNX_DTYPES[init.data_type],
            "shape": list(init.dims),
            "offset": int(location.get("offset", 0)),
            "length": int(location["length"]),
        }
        if init.name in renamed:
            param, transposed = renamed[init.name]
            index[init.name].update(param=param, transposed=transposed)
    path.write_text(json.dumps(index))


def _reusable(out: Path, info: CheckpointInfo, target: str, recorded: dict) -> bool:
    try:
        manifest = read_manifest(out)
    except PackageError:
        return False
    return (
        manifest.source_digest == info.digest
        and manifest.target == target
        and manifest.tools.get("kiln-export") == EXPORT_REVISION
        and manifest.extra.get("export_options", {}) == recorded
    )


def _kiln_hints(checkpoint: Path) -> dict:
    """Optional `kiln.json` beside model_index.json: serving hints a checkpoint's author knows."""
    path = checkpoint / "kiln.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def unet_in_channels(unet_config, latent_channels: int) -> int:
    """The UNet's input channels: the latents', or 2 x those + 1 for an inpainting UNet."""
    channels = int(unet_config.in_channels)
    if channels not in (latent_channels, 2 * latent_channels + 1):
        raise CheckpointError(
            f"the UNet takes {channels} input channels; Kiln runs text-to-image UNets ({latent_channels}, the latents') "
            f"and inpainting UNets ({2 * latent_channels + 1}: latents, mask, masked-image latents)"
        )
    return channels


def vae_latent_stats(vae_config, family: str) -> tuple[list[float] | None, list[float] | None]:
    """(latents_mean, latents_std) from the VAE config, where the family's diffusers pipelines use them.

    diffusers' SDXL pipelines normalise latents per channel when the VAE config has both; its SD
    1.x/2.x pipelines never read them, so neither does a Kiln package of those families.
    """
    mean, std = getattr(vae_config, "latents_mean", None), getattr(vae_config, "latents_std", None)
    if family != "sdxl" or mean is None or std is None:
        return None, None
    channels = int(vae_config.latent_channels)
    if len(mean) != channels or len(std) != channels:
        raise CheckpointError(
            f"the VAE config's latents_mean ({len(mean)} values) and latents_std ({len(std)}) must have one value "
            f"per latent channel ({channels})"
        )
    return [float(v) for v in mean], [float(v) for v in std]


def default_sampling(info: CheckpointInfo, scheduler: dict) -> Defaults:
    # Zero-terminal-SNR v-prediction models want trailing DDIM and guidance rescale (Lin et al. 2023).
    if scheduler.get("rescale_betas_zero_snr"):
        return Defaults(sampler="ddim", steps=20, guidance_scale=6.0, guidance_rescale=0.7)
    return Defaults(sampler="euler", steps=30, guidance_scale=7.5 if info.family != "sdxl" else 5.0)


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def inspect_source(
    checkpoint: Path, options: SingleFileOptions, vae: Path | None, scratch: Path
) -> tuple[CheckpointInfo, SingleFile | None]:
    """Hash and classify a checkpoint folder or single file (+ a VAE override); nothing is loaded."""
    checkpoint = Path(checkpoint)
    single = None
    if checkpoint.is_file() or (not checkpoint.exists() and checkpoint.suffix.lower() in SINGLE_FILE_SUFFIXES):
        single = prepare_single_file(checkpoint, options, scratch)
        info = single.info
    else:
        if options.given:
            raise CheckpointError(
                f"--config, --prediction-type and --default-size are for single-file checkpoints; {checkpoint} is a "
                f"folder, whose scheduler and UNet configs say these"
            )
        info = inspect_checkpoint(checkpoint)
    if vae is not None:
        from export.vae_override import vae_hashes

        info = replace(info, file_hashes={**info.file_hashes, **vae_hashes(Path(vae))})
    return info, single


def _load_pipeline(checkpoint: Path, info: CheckpointInfo, single: SingleFile | None, vae: Path | None):
    if single is not None:
        from export.single_file import load_single_file_pipeline

        pipeline = load_single_file_pipeline(single, skip_vae=vae is not None)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipeline = DiffusionPipeline.from_pretrained(str(checkpoint))
        except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
            raise CheckpointError(f"diffusers could not load {checkpoint}: {e}") from None
    if vae is not None:
        from export.vae_override import load_vae_override

        pipeline.register_modules(vae=load_vae_override(Path(vae), info.path / "vae"))
    return pipeline


def build_package(
    checkpoint: Path,
    out_root: Path = Path("build"),
    target: str = "cpu",
    name: str | None = None,
    force: bool = False,
    opset: int = DEFAULT_OPSET,
    sizes: tuple[str, ...] = (),
    batches: tuple[int, ...] = (),
    vae: Path | None = None,
    single_file: SingleFileOptions | None = None,
) -> Path:
    """Export `checkpoint` (a diffusers folder or a single .safetensors file) for `target`; returns the package folder.

    `sizes` ("WxH") and `batches` (images per batch) are TARGET=tensorrt's: its engines are built
    per size for that batch range. `vae` replaces the checkpoint's VAE (export/vae_override.py);
    `single_file` says what a single file cannot (export/single_file.py).
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    from export.targets import TargetOptions, check_target_tools

    target_options = TargetOptions(tuple(sizes), tuple(int(b) for b in batches))
    check_target_tools(target, target_options)
    scratch = Path(tempfile.mkdtemp(prefix="kiln-export-"))  # a single file's config folder lives here
    try:
        return _build(
            Path(checkpoint), Path(out_root), target, name, force, opset, target_options, vae,
            single_file or SingleFileOptions(), scratch,
        )  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build(checkpoint, out_root, target, name, force, opset, target_options, vae, options, scratch) -> Path:
    stages = Stages(8)
    stages.start(f"inspect {checkpoint}")
    info, single = inspect_source(checkpoint, options, vae, scratch)
    name = name or (checkpoint.stem if single else checkpoint.resolve().name)
    out = Path(out_root) / name / target
    stages.done(f"({info.family}, {info.prediction_type}, digest {info.digest[:12]})")
    if not force and _reusable(out, info, target, target_options.recorded()):
        log.info("%s is up to date with %s (same file hashes); use --force to rebuild", out, checkpoint)
        return out

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stages.start("load the checkpoint with diffusers" + (" (single file)" if single else ""))
        pipeline = _load_pipeline(checkpoint, info, single, vae)
        vae_config = pipeline.vae.config
        in_channels = unet_in_channels(pipeline.unet.config, int(vae_config.latent_channels))  # refuse before exporting
        latents_mean, latents_std = vae_latent_stats(vae_config, info.family)
        stages.done()

        stages.start("export text encoder(s), UNet and VAE encoder and decoder to ONNX (optimum)")
        from export.onnx_export import export_components

        onnx_paths = export_components(pipeline, tmp, opset)
        stages.done(f"({', '.join(onnx_paths)})")

        stages.start("split weights out of the graphs")
        components = {name: split_weights(path) for name, path in onnx_paths.items()}
        stages.done()

        stages.start(f"optimise for {target}")
        from export.targets import optimise_for_target

        result = optimise_for_target(target, tmp, components, info, target_options)
        components = result.components
        stages.done(f"({result.precision})")

        stages.start("tokenizers")
        from export.tokenizer_files import write_tokenizer

        tokenizers = [write_tokenizer(info.path, tmp, folder) for folder in info.tokenizers]
        stages.done()

        stages.start("manifest")
        scheduler = json.loads((info.path / "scheduler" / "scheduler_config.json").read_text())
        native = NATIVE_SIDE[info.family]
        if info.family != "sdxl" and getattr(pipeline.unet.config, "sample_size", None):
            native = int(pipeline.unet.config.sample_size) * 8 if pipeline.unet.config.sample_size >= 32 else native
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            name=name,
            family=info.family,
            prediction_type=info.prediction_type,
            target=target,
            precision=result.precision,
            opset=opset,
            components=components,
            tokenizers=tokenizers,
            scheduler_config=scheduler,
            vae_scaling_factor=float(vae_config.scaling_factor),
            latent_channels=int(vae_config.latent_channels),
            vae_scale_factor=2 ** (len(vae_config.block_out_channels) - 1),
            sizes=SizeLimits(
                min_side=64, max_side=2048, multiple_of=8, default=f"{native}x{native}", native=f"{native}x{native}",
                render_max_side=_kiln_hints(info.path).get("render_max_side"),
            ),
            defaults=default_sampling(info, scheduler),
            source_digest=info.digest,
            source_files=info.file_hashes,
            tools={**tool_versions(), "kiln-export": EXPORT_REVISION},
            force_zeros_for_empty_prompt=bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False)),
            unet_in_channels=in_channels,
            vae_latents_mean=latents_mean,
            vae_latents_std=latents_std,
            source_path=str((single.file if single else info.path).resolve()),
            extra={**result.extra, **({"export_options": target_options.recorded()} if target_options.recorded() else {})},
        )
        from export.targets import finish_for_target

        manifest = finish_for_target(target, tmp, manifest, target_options)
        write_manifest(tmp, manifest)
        stages.done()

        stages.start(f"move into place at {out}")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        stages.done()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
