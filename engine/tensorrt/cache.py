"""TensorRT engines in a package: their cache keys, their manifest section, and the checks at load.

A TensorRT engine runs only on the GPU model it was built for, with the TensorRT version that
built it, for the shapes of its profile, and is only as current as the ONNX graph it came from.
All of that goes into the engine's key (a sha256), which is stored in the manifest and in the
engine's file name. At load the key is computed again from this machine's GPU and TensorRT and
the package's ONNX hashes; any difference is refused with the command that rebuilds the engines
here from the package's own ONNX graphs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import msgspec

from engine.errors import IncompatiblePackageError, InvalidRequestError, PackageError
from engine.manifest import Manifest
from engine.tensorrt.profiles import Profile

log = logging.getLogger(__name__)

SECTION = "tensorrt"  # the manifest's extra[SECTION]
KEY_VERSION = 1  # bump when the key's recipe changes


@dataclass(frozen=True)
class GpuIdentity:
    name: str  # "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"


class EngineEntry(msgspec.Struct, frozen=True):
    component: str
    size: str | None  # "WxH"; None: one engine for every size (text encoders)
    file: str  # relative to the package: engines/<component>_<size>_<key[:12]>.plan
    key: str  # engine_key(...)
    precision: str  # fp16 | fp32 (SDXL's VAE)
    profile: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"}
    bytes: int = 0
    # Built with BuilderFlag.REFIT: its weights can be replaced by name, which is how LoRAs are
    # applied (engine/tensorrt/refit.py). Only the components LoRAs adapt are ever built so.
    refit: bool = False


class TensorRTSection(msgspec.Struct, frozen=True):
    tensorrt_version: str
    gpu: str
    compute_capability: str
    sizes: list[str]
    batches: list[int]
    engines: list[EngineEntry]
    timing_cache: str | None = None  # relative path of the timing cache the builds used
    refit: bool = False  # the UNet's and text encoders' engines were built refittable (`--refit`)


def engine_key(
    component: str,
    size: str | None,
    onnx_sha256: str,
    profile: dict[str, Profile] | dict[str, dict[str, list[int]]],
    gpu: GpuIdentity,
    tensorrt_version: str,
    precision: str,
    refit: bool = False,
) -> str:
    """sha256 over everything an engine depends on; equal keys mean an interchangeable engine."""
    shapes = {name: p.as_dict() if isinstance(p, Profile) else p for name, p in sorted(profile.items())}
    recipe = {
        "key_version": KEY_VERSION,
        "component": component,
        "size": size,
        "onnx_sha256": onnx_sha256,
        "profile": shapes,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "tensorrt": tensorrt_version,
        "precision": precision,
    }
    if refit:  # only when set, so the keys of engines built before refit existed stay valid
        recipe["refit"] = True
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def engine_file(component: str, size: str | None, key: str) -> str:
    return f"engines/{component}_{size or 'any'}_{key[:12]}.plan"


def rebuild_command(package: Path) -> str:
    return f"python -m export.tensorrt_engines {package}"


def read_section(manifest: Manifest, package: Path) -> TensorRTSection:
    raw = manifest.extra.get(SECTION)
    if raw is None:
        raise PackageError(f"{package} targets tensorrt but its manifest lists no engines; rebuild them: {rebuild_command(package)}")
    try:
        return msgspec.convert(raw, TensorRTSection)
    except msgspec.ValidationError as e:
        raise PackageError(f"{package}/manifest.json: the tensorrt section is invalid ({e}); rebuild: {rebuild_command(package)}") from None


def check_compatible(manifest: Manifest, section: TensorRTSection, package: Path, gpu: GpuIdentity, tensorrt_version: str) -> None:
    """Refuse engines this machine cannot run, or that are stale against the package's ONNX."""
    here = f"{gpu.name} (compute capability {gpu.compute_capability}) with TensorRT {tensorrt_version}"
    built = f"{section.gpu} (compute capability {section.compute_capability}) with TensorRT {section.tensorrt_version}"
    if (section.gpu, section.compute_capability, section.tensorrt_version) != (gpu.name, gpu.compute_capability, tensorrt_version):
        raise IncompatiblePackageError(
            f"the TensorRT engines in {package} were built for {built}; this machine has {here}. "
            f"Engines run only where they were built: rebuild them here with `{rebuild_command(package)}`"
        )
    for entry in section.engines:
        component = manifest.components.get(entry.component)
        if component is None:
            raise PackageError(f"{package}: engine {entry.file} is for {entry.component!r}, which the package lacks")
        expected = engine_key(
            entry.component, entry.size, component.sha256, entry.profile, gpu, tensorrt_version, entry.precision, entry.refit
        )
        if expected != entry.key:
            raise IncompatiblePackageError(
                f"{package}: engine {entry.file} does not match the package's {entry.component} graph or its recorded "
                f"profile (key {entry.key[:12]}, expected {expected[:12]}); rebuild: `{rebuild_command(package)}`"
            )
        path = package / entry.file
        if not path.is_file() or (entry.bytes and path.stat().st_size != entry.bytes):
            raise PackageError(f"{path} is missing or truncated; rebuild the engines: `{rebuild_command(package)}`")
    per_size = {e.component for e in section.engines if e.size is not None}
    for component in manifest.components:
        if component in per_size:
            built_sizes = {e.size for e in section.engines if e.component == component}
            if built_sizes != set(section.sizes):
                raise PackageError(f"{package}: {component} has engines for {sorted(built_sizes)}, the manifest lists {section.sizes}")
        elif not any(e.component == component for e in section.engines):
            raise PackageError(f"{package}: no TensorRT engine for {component}; rebuild: `{rebuild_command(package)}`")


def check_engine_size(section: TensorRTSection, width: int, height: int) -> None:
    """A request for a size without engines -> InvalidRequestError listing the sizes built."""
    size = f"{width}x{height}"
    if size not in section.sizes:
        raise InvalidRequestError(
            f"size {size} has no TensorRT engine in this package; built sizes: {', '.join(section.sizes)} "
            f"(export again with SIZES=... to add it)",
            param="size",
        )


def max_batch(section: TensorRTSection) -> int:
    return max(section.batches)


def gpu_identity(device_id: int = 0) -> GpuIdentity:
    """This machine's GPU model and compute capability: from CuPy, else cuda-python, else nvidia-smi."""
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        return GpuIdentity(name, f"{props['major']}.{props['minor']}")
    except Exception as e:  # ImportError, or CuPy without a usable device
        log.debug("CuPy cannot describe GPU %d: %s", device_id, e)
    try:
        from cuda.bindings import runtime as cudart

        err, props = cudart.cudaGetDeviceProperties(device_id)
        if int(err) == 0:
            return GpuIdentity(props.name.decode().rstrip("\0"), f"{props.major}.{props.minor}")
    except Exception as e:  # ImportError, or no device
        log.debug("cuda-python cannot describe GPU %d: %s", device_id, e)
    if shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", f"--id={device_id}", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True,
        )
        if done.returncode == 0 and "," in done.stdout:
            name, cc = (part.strip() for part in done.stdout.strip().splitlines()[0].rsplit(",", 1))
            return GpuIdentity(name, cc)
    raise PackageError(
        f"no NVIDIA GPU {device_id} is visible (CuPy, cuda-python and nvidia-smi could not find one): TensorRT "
        f"engines are built and run on an NVIDIA GPU with its driver installed"
    )
