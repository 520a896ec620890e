"""The .safetensors format's header, read and checked without torch, numpy or the safetensors package.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the tensor bytes, offsets relative to the end of the header. Every size is checked against
the file before a byte of data is read, so a file cut short, a file that is not safetensors and a
header that lies about sizes are each refused by name. Checkpoints (export/safetensors_header.py)
and LoRAs (engine/lora/safetensors_file.py) both read their files through `read_header`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # byte offsets in the data after the header
    end: int = 0


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # where the tensor data begins in the file (8 + N)


def read_header(
    f: BinaryIO,
    path: Path,
    size: int,
    error: type[Exception],
    not_safetensors: Callable[[bytes], None] = lambda head: None,
) -> Header:
    """The checked header of the open file `f` (`size` bytes); `error(message)` for a bad one.

    `not_safetensors(first 8 bytes)` runs before the file is refused as not safetensors at all
    (a header length or JSON that makes no sense), so a caller can name what the file is instead."""
    head = f.read(8)
    if len(head) < 8:
        raise error(f"{path} is {size} bytes: too short to be a .safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        not_safetensors(head)
    if n > MAX_HEADER_BYTES:
        raise error(
            f"{path} is not a .safetensors file: its first 8 bytes give a {n}-byte header (more than the "
            f"format's {MAX_HEADER_BYTES}-byte limit)"
        )
    if 8 + n > size:
        raise error(f"{path} is truncated: its header alone should be {n} bytes, the file is {size}")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        not_safetensors(head)
        raise error(f"{path} is not a .safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{path} is not a .safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise error(f"{path}: the header's __metadata__ is not a JSON object")
    data_bytes = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise error(f"{path}: the header's entry for {name} is malformed: {entry!r}") from None
        if dtype not in DTYPE_BYTES:
            raise error(f"{path}: tensor {name} has unknown dtype {dtype!r}")
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end - begin != expected:
            span = end - begin if isinstance(begin, int) and isinstance(end, int) else "?"
            raise error(
                f"{path}: the header lies about tensor {name}: {dtype} {list(shape)} is {expected} bytes, "
                f"its offsets {begin}..{end} span {span}"
            )
        if end > data_bytes:
            raise error(
                f"{path} is truncated: tensor {name} ends at byte {end} after the header, the file holds {data_bytes}"
            )
        tensors[name] = TensorInfo(dtype, shape, begin, end)
    if not tensors:
        raise error(f"{path} holds no tensors")
    return Header(tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + n)
