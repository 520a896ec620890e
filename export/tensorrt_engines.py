"""TARGET=tensorrt: TensorRT engines per resolution, built from a package's own ONNX graphs.

    make export MODEL=<dir> TARGET=tensorrt SIZES=512x512,1024x1024 BATCH=1,2,4
    python -m export.tensorrt_engines build/<name>/tensorrt [--sizes ...] [--batch ...] [--refit]   # rebuild here

NOT YET RUN: TensorRT cannot be installed on the GPU machines this project can reach. Written
against the TensorRT 10 Python API; what is tested without it is the profile arithmetic, the
cache keys, the manifest section and the errors.

Steps, one function each (TensorRT demo/Diffusion's order): check the builder -> plan the
engines (component x size, profiles, keys) -> build each engine (parse the ONNX, one
optimisation profile, fp16, a timing cache shared by all builds) -> record them in the manifest.
An engine whose key matches one already in the package (or in `reuse_from`) is not rebuilt.

`--refit` builds the UNet and text-encoder engines with `BuilderFlag.REFIT`, so that LoRAs can be
written into them per request (engine/tensorrt/refit.py); the VAE's never need it. It is a
choice, as in NVIDIA's demo/Diffusion (`--build-enable-refit`), because a refittable engine
may run slower: every weight must stay replaceable, so TensorRT may fuse fewer. The choice is kept in
the package's tensorrt section (`refit`, and per engine) and in each engine's key; a rebuild
without --refit or --no-refit keeps it, and so does `kiln export` replacing the package.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from engine.errors import KilnError, PackageError
from engine.manifest import Manifest, read_manifest, write_manifest
from engine.shapes import check_size, parse_size
from engine.tensorrt.cache import (
    SECTION,
    EngineEntry,
    GpuIdentity,
    TensorRTSection,
    engine_file,
    engine_key,
    gpu_identity,
)
from engine.tensorrt.profiles import BatchRange, Profile, component_profiles, engine_sizes
from engine.tensorrt.refit import REFIT_COMPONENTS
from export.cuda_fp16 import fp32_components

log = logging.getLogger(__name__)

TIMING_CACHE = "engines/timing.cache"
INSTALL_HINT = (
    "install NVIDIA TensorRT 10 for your CUDA version (`pip install tensorrt-cu12`, or tensorrt-cu13) "
    "and CuPy (`pip install cupy-cuda12x`) on a machine with an NVIDIA GPU and driver"
)
DEFAULT_WORKSPACE_GIB = 8.0


def check_builder() -> None:
    """Raise PackageError naming what to install unless TensorRT can build here (needs a GPU)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise PackageError(f"TARGET=tensorrt needs the `tensorrt` Python package, which is not installed: {INSTALL_HINT}") from None
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except (RuntimeError, TypeError) as e:  # TensorRT raises these when CUDA cannot start
        builder, reason = None, str(e)
    else:
        reason = "no CUDA device"
    if builder is None:
        raise PackageError(
            f"TensorRT {trt.__version__} cannot create a builder ({reason}): engines are built on the NVIDIA GPU "
            f"they will run on, with its driver installed; run the export on that machine"
        )
    gpu_identity()  # raises if the GPU cannot be named for the engine keys


@dataclass(frozen=True)
class PlannedEngine:
    entry: EngineEntry
    onnx: Path
    profiles: dict[str, Profile]
    fp16: bool


def plan_engines(
    folder: Path, manifest: Manifest, sizes: list[str], batch: BatchRange, gpu: GpuIdentity, tensorrt_version: str,
    refit: bool = False,
) -> list[PlannedEngine]:
    """Every engine the package needs, with its profile and key. Pure: builds nothing.
    `refit`: the engines of the components LoRAs adapt are built refittable."""
    for size in sizes:
        width, height = parse_size(size, param="SIZES")
        check_size(width, height, manifest.sizes, param="SIZES")
    sequence_length = max(t.max_length for t in manifest.tokenizers)
    fp32 = fp32_components(manifest.family)  # SDXL's VAE overflows fp16
    planned = []
    for name, component in manifest.components.items():
        for size in engine_sizes(name, sizes):
            profiles = component_profiles(
                name, component, size, batch, sequence_length, manifest.latent_channels, manifest.vae_scale_factor
            )
            precision = "fp32" if name in fp32 else "fp16"
            refittable = refit and name in REFIT_COMPONENTS
            key = engine_key(name, size, component.sha256, profiles, gpu, tensorrt_version, precision, refittable)
            entry = EngineEntry(
                component=name, size=size, file=engine_file(name, size, key), key=key, precision=precision,
                profile={input_name: p.as_dict() for input_name, p in profiles.items()}, refit=refittable,
            )
            planned.append(PlannedEngine(entry, folder / component.file, profiles, precision == "fp16"))
    return planned


def build_engine(
    trt, onnx_path: Path, profiles: dict[str, Profile], fp16: bool, timing_cache: bytes, workspace_gib: float,
    refit: bool = False,
):
    """Parse `onnx_path` and build one serialized engine; returns (plan bytes, timing cache bytes).
    `refit`: weights replaceable by their ONNX initializer names (TensorRT's "Refitting an Engine")."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves the external weights.bin next to model.onnx
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise PackageError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if refit:  # REFIT, not REFIT_IDENTICAL: LoRAs write weights other than those built with
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PackageError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(
    folder: Path,
    manifest: Manifest,
    sizes: tuple[str, ...] | list[str] = (),
    batches: tuple[int, ...] | list[int] = (),
    reuse_from: Path | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    refit: bool | None = None,
) -> Manifest:
    """Build (or reuse) the engines of the package in `folder`; returns its manifest with them.
    `refit`: the UNet and text-encoder engines are built refittable, so LoRAs can be served;
    None keeps the package's choice (or that of the package in `reuse_from`, which it replaces)."""
    check_builder()
    import tensorrt as trt

    if refit is None:
        refit = _refit_choice(manifest, reuse_from)
    sizes = list(sizes) or [manifest.sizes.default]
    batch = BatchRange(tuple(int(b) for b in batches) or (1,))
    gpu = gpu_identity()
    log.info("TensorRT %s on %s (compute capability %s): sizes %s, batch %s%s", trt.__version__, gpu.name,
             gpu.compute_capability, ",".join(sizes), ",".join(map(str, batch.images)), ", refittable" if refit else "")
    planned = plan_engines(folder, manifest, sizes, batch, gpu, trt.__version__, refit)
    (folder / "engines").mkdir(exist_ok=True)
    cache_path = folder / TIMING_CACHE
    if not cache_path.is_file() and reuse_from and (reuse_from / TIMING_CACHE).is_file():
        shutil.copyfile(reuse_from / TIMING_CACHE, cache_path)
    timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
    entries = []
    for k, plan in enumerate(planned, 1):
        target = folder / plan.entry.file
        old = reuse_from / plan.entry.file if reuse_from else None
        if not target.is_file() and old is not None and old.is_file():
            shutil.copyfile(old, target)
        if target.is_file():
            log.info("[engine %d/%d] %s: reused %s", k, len(planned), plan.entry.component, target.name)
        else:
            start = time.perf_counter()
            log.info("[engine %d/%d] %s %s (%s%s) ...", k, len(planned), plan.entry.component, plan.entry.size or "all sizes",
                     plan.entry.precision, ", refittable" if plan.entry.refit else "")
            data, timing_cache = build_engine(
                trt, plan.onnx, plan.profiles, plan.fp16, timing_cache, workspace_gib, refit=plan.entry.refit
            )
            target.write_bytes(data)
            cache_path.write_bytes(timing_cache)  # after each build, so an interrupted run keeps its tuning
            log.info("[engine %d/%d] built in %.0fs, %.0f MiB", k, len(planned), time.perf_counter() - start, len(data) / 2**20)
        entries.append(msgspec.structs.replace(plan.entry, bytes=target.stat().st_size))
    keep = {e.file for e in entries} | {TIMING_CACHE}
    for stale in (folder / "engines").glob("*"):
        if f"engines/{stale.name}" not in keep:
            stale.unlink()
    section = TensorRTSection(
        tensorrt_version=trt.__version__, gpu=gpu.name, compute_capability=gpu.compute_capability, sizes=sizes,
        batches=list(batch.images), engines=entries, timing_cache=TIMING_CACHE if cache_path.is_file() else None,
        refit=refit,
    )
    extra = {**manifest.extra, SECTION: msgspec.to_builtins(section)}
    return msgspec.structs.replace(manifest, precision="fp16", extra=extra)


def _refit_choice(manifest: Manifest, reuse_from: Path | None) -> bool:
    """Whether the package's engines (or, for a new export, its predecessor's) were refittable."""
    section = manifest.extra.get(SECTION)
    if section is None and reuse_from is not None and (reuse_from / "manifest.json").is_file():
        try:
            section = read_manifest(reuse_from).extra.get(SECTION)
        except PackageError as e:  # a predecessor that cannot be read is being replaced anyway
            log.info("not reusing the refit choice of %s: %s", reuse_from, e)
    return bool((section or {}).get("refit", False))


def main(argv: list[str] | None = None) -> int:
    """Rebuild a tensorrt package's engines on this machine from the package's ONNX graphs."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("package", type=Path)
    parser.add_argument("--sizes", help="comma-separated WxH (default: the sizes the package lists)")
    parser.add_argument("--batch", help="comma-separated images per batch (default: the package's)")
    parser.add_argument("--workspace-gib", type=float, default=DEFAULT_WORKSPACE_GIB)
    parser.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, default=None,
        help="build the UNet and text-encoder engines refittable, so LoRAs can be served (default: as the package's are)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        manifest = read_manifest(args.package)
        if manifest.target != "tensorrt":
            raise PackageError(f"{args.package} is a {manifest.target} package; export it with --target tensorrt")
        old = manifest.extra.get(SECTION, {})
        sizes = args.sizes.split(",") if args.sizes else old.get("sizes", [])
        batches = [int(b) for b in args.batch.split(",")] if args.batch else old.get("batches", [])
        manifest = build_engines(args.package, manifest, sizes, batches, workspace_gib=args.workspace_gib, refit=args.refit)
        options = dict(manifest.extra.get("export_options", {}), sizes=list(manifest.extra[SECTION]["sizes"]),
                       batches=list(manifest.extra[SECTION]["batches"]))
        write_manifest(args.package, msgspec.structs.replace(manifest, extra={**manifest.extra, "export_options": options}))
    except (KilnError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    print(args.package)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
