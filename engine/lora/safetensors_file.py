"""Read a .safetensors file into numpy arrays without torch or the `safetensors` package.

Format (https://github.com/huggingface/safetensors#format): 8 bytes little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the tensor bytes, offsets relative to the end of the header. Every size is checked against
the file before a byte of data is read, so a truncated file, a file that is not safetensors and a
header that lies about sizes are each refused by name.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np

from engine.lora.errors import LoraFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
# safetensors dtype -> numpy dtype; BF16 is read as uint16 and widened to float32 below.
DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array, the header's `__metadata__`) of the file at `path`; LoraFileError if it is bad.

    Floating tensors come back as float32 (BF16 and F16 widened), others in their own dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist or is not a file")
    data = path.read_bytes()
    size = len(data)
    if size < 8:
        raise LoraFileError(f"{path} is {size} bytes: too short to be a .safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise LoraFileError(
            f"{path} is not a .safetensors file: its first 8 bytes give a {n}-byte header (more than the format's "
            f"{MAX_HEADER_BYTES}-byte limit)"
        )
    if 8 + n > size:
        raise LoraFileError(f"{path} is truncated: its header alone should be {n} bytes, the file is {size}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path} is not a .safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"{path} is not a .safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraFileError(f"{path}: the header's __metadata__ is not a JSON object")
    body = memoryview(data)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise LoraFileError(f"{path}: the header's entry for {name} is malformed: {entry!r}") from None
        if dtype not in DTYPES:
            raise LoraFileError(f"{path}: tensor {name} has dtype {dtype!r}, which a LoRA file does not use")
        expected = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or begin < 0 or end - begin != expected:
            raise LoraFileError(
                f"{path}: the header lies about tensor {name}: {dtype} {list(shape)} is {expected} bytes, "
                f"its offsets {begin}..{end} span {end - begin if isinstance(end, int) and isinstance(begin, int) else '?'}"
            )
        if end > len(body):
            raise LoraFileError(
                f"{path} is truncated: tensor {name} ends at byte {end} after the header, the file holds {len(body)}"
            )
        array = np.frombuffer(body[begin:end], dtype=DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        tensors[name] = array
    if not tensors:
        raise LoraFileError(f"{path} holds no tensors")
    return tensors, {str(k): str(v) for k, v in metadata.items()}
