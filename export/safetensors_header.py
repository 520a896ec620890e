"""A checkpoint file's tensors, by name, read from its header without loading a weight (or torch).

The format's own checks (a file cut short, a header that is not JSON, sizes that do not add up)
are engine/safetensors_format.py's; this adds the one a checkpoint needs first: a pickle passed as
a checkpoint is refused by name, with the command that converts it.
"""

from __future__ import annotations

from pathlib import Path

from engine import safetensors_format
from engine.errors import CheckpointError
from engine.safetensors_format import TensorInfo

__all__ = ["TensorInfo", "read_header"]

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CONVERT_HINT = (
    "convert it once, in an environment you trust, with: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('MODEL.ckpt', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'MODEL.safetensors')\""
)


def _refuse_pickle(path: Path, head: bytes | None = None) -> None:
    """Refuse a pickle by its suffix, or (head given: the file is not valid safetensors) by its first bytes."""
    # torch.save writes a zip archive (PK\x03\x04) since 1.6, a bare pickle (0x80, protocol 2-5) before.
    pickle_starts = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
    looks_pickled = head is not None and head.startswith(pickle_starts)
    if path.suffix.lower() in PICKLE_SUFFIXES or looks_pickled:
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint: loading a pickle can run arbitrary code, so Kiln does not "
            f"load one; {CONVERT_HINT}"
        )


def read_header(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor in the .safetensors file at `path`; CheckpointError if bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist or is not a file")
    _refuse_pickle(path)
    with open(path, "rb") as f:
        header = safetensors_format.read_header(
            f, path, path.stat().st_size, CheckpointError, not_safetensors=lambda head: _refuse_pickle(path, head)
        )
    return header.tensors
