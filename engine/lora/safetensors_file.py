"""Read a .safetensors file into numpy arrays without torch or the `safetensors` package.

The header and every size in it are checked first (engine/safetensors_format.py), so a truncated
file, a file that is not safetensors and a header that lies about sizes are each refused by name
before a byte of data is read.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from engine.lora.errors import LoraFileError
from engine.safetensors_format import read_header

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
    header = read_header(io.BytesIO(data), path, len(data), LoraFileError)
    body = memoryview(data)[header.data_start :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.tensors.items():
        dtype, shape, begin, end = info.dtype, info.shape, info.begin, info.end
        if dtype not in DTYPES:
            raise LoraFileError(f"{path}: tensor {name} has dtype {dtype!r}, which a LoRA file does not use")
        array = np.frombuffer(body[begin:end], dtype=DTYPES[dtype]).reshape(shape)
        if dtype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)
        tensors[name] = array
    return tensors, header.metadata  # read_header refuses a file without tensors
