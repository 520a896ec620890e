"""The packages benchmarks run on: the bundled model, a tiny test model, the SD 1.5 architecture.

Each is built on first use: random-weight checkpoints from their architecture configs, then the
same export path users run. Timing does not depend on weight values, never on zeros.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_CHECKPOINT = ROOT / "build" / "test-cache" / "checkpoints" / "sd1"
TINY_PACKAGE = ROOT / "build" / "test-cache" / "packages" / "sd1" / "cpu"
SD15_CHECKPOINT = ROOT / "build" / "checkpoints" / "sd15-random"
SD15_PACKAGE = ROOT / "build" / "sd15-random" / "cpu"


def _random_package(architecture: Path, checkpoint: Path, package: Path) -> Path:
    from export.package import build_package
    from export.random_checkpoint import build_random_checkpoint

    if not (checkpoint / "model_index.json").is_file():
        build_random_checkpoint(architecture, checkpoint, seed=0)
    return build_package(checkpoint, package.parents[1], target="cpu", name=package.parent.name)


def tiny_package() -> Path:
    """The tiny random-weight SD 1.x test model (tests/assets/tiny/sd1), exported."""
    return _random_package(ROOT / "tests" / "assets" / "tiny" / "sd1", TINY_CHECKPOINT, TINY_PACKAGE)


def sd15_package() -> Path:
    """The real SD 1.5 architecture with random weights (about 5 minutes and 10 GB to export)."""
    return _random_package(ROOT / "export" / "architectures" / "sd15", SD15_CHECKPOINT, SD15_PACKAGE)


def openvino_sibling(cpu_package: Path) -> Path | None:
    """The openvino package beside `cpu_package`, derived on first use; None without openvino."""
    import importlib.util

    if importlib.util.find_spec("openvino") is None:
        print("openvino is not installed: its package is not measured (pip install 'kiln[openvino]')")
        return None
    from export.openvino_ir import derive_openvino_package

    return derive_openvino_package(cpu_package)


def choose_package(given: str | None) -> tuple[Path, str]:
    """(package, what it is): `given`, else the bundled model's package, else the tiny SD 1.x one."""
    if given:
        return Path(given), f"package {given}"
    from kiln.default_model import DEFAULT_MODEL, ensure_package

    if (DEFAULT_MODEL / "model_index.json").is_file():
        return ensure_package(), f"default model {DEFAULT_MODEL.name}"
    return tiny_package(), f"FALLBACK: tiny random-weight SD1 test package (no {DEFAULT_MODEL.relative_to(ROOT)} yet)"
