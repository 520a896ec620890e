"""Regenerate inference_pb2.py and inference_pb2_grpc.py from inference.proto.

    python -m engine.worker.codegen

Needs grpcio-tools (the dev extra). The proto is compiled with the repository root as include
path, so the generated stub imports `engine.worker.inference_pb2` by its package path.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = Path("engine/worker/inference.proto")


def main() -> int:
    try:
        from grpc_tools import protoc
    except ImportError:
        print("grpcio-tools is missing: pip install -e '.[dev]'", file=sys.stderr)
        return 1
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"-I{well_known}",
            f"--python_out={ROOT}",
            f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}",
            str(ROOT / PROTO),
        ]
    )
    if rc != 0:
        print(f"protoc failed on {PROTO} (exit {rc})", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
