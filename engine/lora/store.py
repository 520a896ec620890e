"""LoRAs stored with a package: `<package>/loras/<name>.safetensors`, listed in `<package>/loras.json`.

`add_lora` checks the file against the package (engine/lora/apply.py) before anything is written;
the file is copied under a temporary name and renamed into place, then `loras.json` is rewritten
the same way, so a failure at any point leaves the package as it was. A server started on the
package afterwards finds the LoRA by name in `loras.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.errors import PackageError
from engine.manifest import read_manifest
from engine.lora.apply import MatchedLora, match_lora
from engine.lora.errors import LoraError, LoraNotFoundError

# Package targets whose runtime applies LoRAs (engine.pipeline.Pipeline.serves_loras): cpu by
# onnxruntime sessions per variant, cuda by a CUDA session per variant (engine/cuda/variants.py),
# tensorrt by refitting engines built with --refit (cuda and tensorrt not yet run on a GPU).
# OpenVINO packages do not (README "LoRAs on GPUs").
SERVED_BY = ("cpu", "cuda", "tensorrt")
INDEX = "loras.json"
FOLDER = "loras"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class StoredLora:
    name: str
    file: str  # relative to the package: loras/<name>.safetensors
    sha256: str
    layout: str  # "kohya" | "diffusers"
    components: list[str]
    weights: int  # how many of the package's weights it changes
    source: str  # the file it was added from, for `kiln lora list`


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.endswith(".safetensors"):
        raise LoraError(
            f"a LoRA name is 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit (it is what "
            f"<lora:NAME:0.8> in a prompt refers to); got {name!r}"
        )
    return name


def list_loras(package: Path) -> dict[str, StoredLora]:
    """name -> StoredLora of the LoRAs stored with `package` ({} when none)."""
    path = Path(package) / INDEX
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        return {name: StoredLora(**entry) for name, entry in raw["loras"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{path} is not a LoRA index Kiln wrote ({e}); remove it and add the LoRAs again") from None


def _write_index(package: Path, loras: dict[str, StoredLora]) -> None:
    text = json.dumps({"loras": {n: asdict(s) for n, s in sorted(loras.items())}}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".loras-", suffix=".json", dir=package)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, package / INDEX)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def add_lora(package: Path, lora_file: Path, name: str, replace: bool = False) -> StoredLora:
    """Check `lora_file` against `package` and store it as `name`; LoraError says why not."""
    package, lora_file = Path(package), Path(lora_file)
    check_name(name)
    if not (package / "manifest.json").is_file():
        raise PackageError(f"{package} is not a model package (no manifest.json)")
    target = read_manifest(package).target
    if target not in SERVED_BY:
        raise LoraError(
            f"{package} is a {target} package; LoRAs are served with {', '.join(SERVED_BY[:-1])} and {SERVED_BY[-1]} packages for now: "
            f"add it to the cpu package of this model"
        )
    loras = list_loras(package)
    if name in loras and not replace:
        raise LoraError(f"{package} already has a LoRA named {name!r}; remove it first or choose another --name")
    matched: MatchedLora = match_lora(package, lora_file)
    folder = package / FOLDER
    folder.mkdir(exist_ok=True)
    dest = folder / f"{name}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        shutil.copyfile(lora_file, tmp)
        entry = StoredLora(
            name=name,
            file=f"{FOLDER}/{name}.safetensors",
            sha256=_sha256(Path(tmp)),
            layout=matched.layout,
            components=matched.components,
            weights=len({(m.pair.component, m.target.initializer) for m in matched.pairs}),
            source=str(lora_file.resolve()),
        )
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        _write_index(package, {**loras, name: entry})
    except BaseException:
        if name not in loras:
            dest.unlink(missing_ok=True)
        raise
    return entry


def _stored(package: Path, name: str) -> tuple[dict[str, StoredLora], StoredLora]:
    """(every LoRA of the package, the one named `name`), or LoraNotFoundError listing them."""
    loras = list_loras(package)
    if name not in loras:
        raise LoraNotFoundError(_not_found(package, name, loras))
    return loras, loras[name]


def remove_lora(package: Path, name: str) -> StoredLora:
    package = Path(package)
    loras, entry = _stored(package, name)
    del loras[name]
    _write_index(package, loras)  # the index first: a LoRA it does not list is never served
    (package / entry.file).unlink(missing_ok=True)
    return entry


def load_lora(package: Path, name: str) -> MatchedLora:
    """The stored LoRA `name`, checked against the package again (its hash too), ready for `deltas(scale)`."""
    package = Path(package)
    return load_entry(package, _stored(package, name)[1])


def load_entry(package: Path, entry: StoredLora) -> MatchedLora:
    """The LoRA `entry` describes, if its file is still the one added (same sha256)."""
    path = Path(package) / entry.file
    if not path.is_file() or _sha256(path) != entry.sha256:
        raise PackageError(
            f"LoRA {entry.name!r}: {path} is missing or changed since it was added; `kiln lora add` it again "
            f"and restart the workers"
        )
    return match_lora(package, path)


def _not_found(package: Path, name: str, loras: dict) -> str:
    have = ", ".join(sorted(loras)) or "none"
    return f"{package} has no LoRA named {name!r} (it has: {have}); add one with `kiln lora add {package} FILE --name {name}`"
