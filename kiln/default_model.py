"""Where the bundled default model lives, where packages are built, and the package, exported on first use.

In a source checkout the checkpoint is `models/kiln-shapes` and packages go to `build/`, next to
the code. An installed Kiln (a wheel: site-packages is no place to write) finds the checkpoint in
`kiln/bundled/` (setup.py maps models/ there) and builds under `$KILN_HOME`, else
`$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
_IN_CHECKOUT = (ROOT / "models" / "kiln-shapes" / "model_index.json").is_file()
DEFAULT_MODEL = ROOT / "models" / "kiln-shapes" if _IN_CHECKOUT else Path(__file__).resolve().parent / "bundled" / "kiln-shapes"


def home() -> Path:
    """Where built packages (and the quick start's hosted images) go."""
    if os.environ.get("KILN_HOME"):
        return Path(os.environ["KILN_HOME"])
    if _IN_CHECKOUT:
        return ROOT / "build"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "kiln"


BUILD = home()


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
