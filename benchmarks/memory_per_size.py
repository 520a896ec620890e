"""Resident memory with one and with five resolutions loaded, weights shared vs not.

Each resolution gets its own fixed-shape onnxruntime sessions; sharing the mapped weights across
them is what keeps five sizes from costing five copies of the UNet. Each mode runs in its own
process so the numbers are not mixed. An openvino package has one compiled model per component
for every size; its modes are the inference precisions.

    python -m benchmarks.memory_per_size --package build/sd15-random/cpu
    python -m benchmarks.memory_per_size --package build/sd15-random/openvino
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SIZES = ["256x256", "320x320", "384x384", "256x384", "384x256"]
RESULTS = Path(__file__).parent / "results"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


MODES = {
    "shared weights+arena": {},
    "shared, all opt (NCHWc)": {"optimization": "all"},
    "shared weights only": {"shared_arena": False},
    "nothing shared": {"shared_arena": False, "share_weights": False},
}
OPENVINO_MODES = {
    "openvino auto (bf16 here)": {"openvino_precision": "auto"},
    "openvino f32": {"openvino_precision": "f32"},
}


def modes_for(package: str) -> dict[str, dict]:
    from engine.manifest import read_manifest

    return OPENVINO_MODES if read_manifest(Path(package)).target == "openvino" else MODES


def child(package: str, mode: str, steps: int) -> dict:
    from engine.pipeline import ImageRequest, Pipeline
    from engine.sessions import RuntimeOptions

    pipe = Pipeline(package, RuntimeOptions(threads=2, **modes_for(package)[mode]))
    after = {"loaded": rss_mib()}
    for k, size in enumerate(SIZES, 1):
        w, h = (int(v) for v in size.split("x"))
        pipe.generate([ImageRequest(prompt="a red circle", width=w, height=h, seed=0, steps=steps)])
        after[f"{k} size{'s' if k > 1 else ''}"] = rss_mib()
    return after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="build/test-cache/packages/sd1/cpu")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default=None, help="comma-separated (default: all of the package's target); "
                        "'nothing shared' of a large model needs 5x its weights in memory")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.package, args.child, args.steps)))
        return 0
    results = {}
    known = modes_for(args.package)
    modes = args.modes.split(",") if args.modes else list(known)
    if unknown := [m for m in modes if m not in known]:
        parser.error(f"unknown modes {unknown} for this package; choose from {list(known)}")
    for mode in modes:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory_per_size", "--package", args.package, "--steps", str(args.steps), "--child", mode],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True,
        )
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"RSS (MiB) of {args.package} as resolutions are added (sizes: {', '.join(SIZES)})")
    print(f"{'after':<10}" + "".join(f"{m:>24}" for m in results))
    for key in results[modes[0]]:
        print(f"{key:<10}" + "".join(f"{results[m][key]:>24.0f}" for m in results))
    RESULTS.mkdir(exist_ok=True)
    target = Path(args.package).name
    out = RESULTS / f"memory_per_size_{Path(args.package).parent.name}{'' if target == 'cpu' else '_' + target}.json"
    out.write_text(json.dumps({"package": args.package, "sizes": SIZES, "rss_mib": results, "date": time.strftime("%Y-%m-%d")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
