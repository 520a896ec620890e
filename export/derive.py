"""Make a package for another target from an exported cpu package, without PyTorch.

The cuda and openvino targets are rewrites of the cpu package's ONNX graphs. Deriving them from
a cpu package gives exactly what `kiln export --target ...` makes, minus the minutes of export
from PyTorch: the benchmarks and tests use it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Callable

import msgspec

from engine.errors import PackageError
from engine.manifest import Component, Manifest, read_manifest, write_manifest

log = logging.getLogger(__name__)

# (folder being assembled, its components) -> (rewritten components, what the rewrite did)
Transform = Callable[[Path, dict[str, Component]], tuple[dict[str, Component], dict]]


def _up_to_date(out: Path, target: str, source: Manifest) -> bool:
    """Whether `out` was derived from `source`'s export; a package of another format is not."""
    try:
        existing = read_manifest(out)
    except PackageError:  # missing, or of another format version: rebuilt
        return False
    return (existing.target, existing.source_digest, existing.tools.get("kiln-export")) == (
        target, source.source_digest, source.tools.get("kiln-export")
    )


def derive_package(
    cpu_package: Path,
    target: str,
    precision: str,
    transform: Transform,
    out: Path | None = None,
    force: bool = False,
    tools: dict[str, str] | None = None,
) -> Path:
    """`cpu_package`'s sibling `<target>/` (or `out`), rebuilt only when the source changed."""
    cpu_package = Path(cpu_package)
    manifest = read_manifest(cpu_package)
    if manifest.target != "cpu":
        raise PackageError(f"{cpu_package} is a {manifest.target} package; derive a {target} package from a cpu one")
    out = Path(out) if out else cpu_package.parent / target
    if not force and _up_to_date(out, target, manifest):
        log.info("%s is up to date with %s; use --force to rebuild", out, cpu_package)
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(cpu_package, tmp)
    try:
        components, details = transform(tmp, manifest.components)
        derived = msgspec.structs.replace(
            manifest, target=target, precision=precision, components=components,
            extra={**manifest.extra, target: details}, tools={**manifest.tools, **(tools or {})},
        )
        write_manifest(tmp, derived)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def derive_main(argv: list[str] | None, target: str, what: str, derive: Callable[[Path, Path | None, bool], Path]) -> int:
    """`python -m export.<module> build/<name>/cpu [out] [--force]` for a derived target."""
    parser = argparse.ArgumentParser(description=f"Make the {target} package ({what}) from an exported cpu package.")
    parser.add_argument("cpu_package", type=Path)
    parser.add_argument("out", type=Path, nargs="?", help=f"default: the cpu package's sibling folder {target}/")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(derive(args.cpu_package, args.out, args.force))
    return 0
