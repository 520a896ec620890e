"""Where the bundled default model lives, and its package, exported on first use."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "kiln-shapes"
BUILD = ROOT / "build"


def default_package(target: str = "cpu") -> Path:
    return BUILD / DEFAULT_MODEL.name / target


def ensure_package(checkpoint: Path = DEFAULT_MODEL, target: str = "cpu", out_root: Path = BUILD) -> Path:
    """The package for `checkpoint`, exported first if it is missing or stale (needs `.[export]`).

    An up-to-date package (same checkpoint file hashes) is reused without loading torch.
    """
    package = out_root / checkpoint.name / target
    try:
        from export.package import build_package

        return build_package(checkpoint, out_root, target=target)
    except ImportError as e:
        if (package / "manifest.json").is_file():
            log.warning("cannot re-check %s against %s without the export extras; using it as it is", package, checkpoint)
            return package
        raise SystemExit(
            f"the package {package} is missing and exporting it needs the export extras "
            f"(pip install '.[export]'): {e}"
        ) from None
