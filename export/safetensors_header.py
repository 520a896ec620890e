"""Read and check a .safetensors file's header without loading a tensor (and without torch).

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the tensor bytes, offsets relative to the end of the header. The checks here are the ones
that let a bad file be refused by name before any weight is read: a pickle passed as a
checkpoint, a file cut short, a header that is not JSON, and a header whose sizes do not add up.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from engine.errors import CheckpointError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CONVERT_HINT = (
    "convert it once, in an environment you trust, with: python -c \"import torch, safetensors.torch as st; "
    "sd = torch.load('MODEL.ckpt', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, 'MODEL.safetensors')\""
)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


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
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_pickle(path)
        if len(head) < 8:
            raise CheckpointError(f"{path} is {size} bytes: too short to be a .safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            _refuse_pickle(path, head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path} is not a .safetensors file: its first 8 bytes give a {n}-byte header (more than the "
                f"format's {MAX_HEADER_BYTES}-byte limit)"
            )
        if 8 + n > size:
            raise CheckpointError(f"{path} is truncated: its header alone should be {n} bytes, the file is {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _refuse_pickle(path, head)
        raise CheckpointError(f"{path} is not a .safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a .safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end_of_data = 0
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path}: the header's entry for {name} is malformed: {entry!r}") from None
        if dtype not in DTYPE_BYTES:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: the header lies about tensor {name}: {dtype} {list(shape)} is {expected} bytes, "
                f"its offsets {begin}..{end} span {end - begin}"
            )
        end_of_data = max(end_of_data, end)
        tensors[name] = TensorInfo(dtype, shape)
    if end_of_data > data_bytes:
        raise CheckpointError(
            f"{path} is truncated: its header places tensor data up to byte {end_of_data} after the header, "
            f"the file holds {data_bytes}"
        )
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors
