"""`make bench`: every benchmark in one run, each printing its table and writing JSON to results/.

    python -m benchmarks.run                 # all of them
    python -m benchmarks.run --only engine   # one group: engine, memory, latency, worker, http, soak
    python -m benchmarks.run --quick         # small workloads only (no SD 1.5 architecture; a 1-minute soak)

The SD 1.5 workload is the real architecture with random weights (timing does not depend on
weight values), built from export/architectures/sd15 and exported on first use (about 5 minutes
and 10 GB of memory on 2 cores).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.workloads import SD15_CHECKPOINT, TINY_CHECKPOINT, openvino_sibling, sd15_package, tiny_package

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")


def run_module(module: str, *args: str) -> None:
    print(f"\n=== python -m {module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, check=True)


def engine(quick: bool) -> None:
    tiny = tiny_package()
    run_module("benchmarks.engine_vs_diffusers", "--checkpoint", str(TINY_CHECKPOINT), "--package", str(tiny),
               "--label", "tiny-sd1", "--size", "256x256", "--steps", "4", "--variants")
    if not quick:
        sd15 = sd15_package()
        run_module("benchmarks.engine_vs_diffusers", "--checkpoint", str(SD15_CHECKPOINT), "--package", str(sd15),
                   "--label", "sd15-architecture", "--size", "256x256", "--steps", "3", "--variants")


def memory(quick: bool) -> None:
    packages = [tiny_package()] + ([] if quick else [sd15_package()])
    for package in packages:
        big = package != packages[0]
        run_module("benchmarks.memory_per_size", "--package", str(package),
                   *(["--modes", "shared weights+arena,shared weights only"] if big else []))
        if openvino := openvino_sibling(package):
            run_module("benchmarks.memory_per_size", "--package", str(openvino))


def latency(quick: bool) -> None:
    """Latency per size: the bundled model's package (else tiny SD1), then the SD 1.5 architecture."""
    run_module("benchmarks.latency_per_size", *(["--quick"] if quick else []))
    from benchmarks.workloads import choose_package

    package, _ = choose_package(None)
    if openvino := openvino_sibling(package):
        run_module("benchmarks.latency_per_size", "--package", str(openvino), "--label", f"{package.parent.name}-openvino",
                   "--no-diffusers", *(["--quick"] if quick else []))
    if not quick:
        sd15 = sd15_package()
        # On 2 CPU cores one SD 1.5 step at 512x512 takes seconds: 3 steps, 1 timed image a size.
        run_module("benchmarks.latency_per_size", "--package", str(sd15), "--checkpoint", str(SD15_CHECKPOINT),
                   "--label", "sd15-architecture", "--sizes", "256x256,512x512", "--steps", "3", "--repeats", "1")


def optional(module: str, quick: bool) -> None:
    """Benchmarks that live in their own module, run if present."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        print(f"\n=== {module}: not present, skipped")
        return
    run_module(module, *(["--quick"] if quick else []))


GROUPS = {
    "engine": engine,
    "memory": memory,
    "latency": latency,
    "worker": lambda quick: optional("benchmarks.worker_throughput", quick),
    "http": lambda quick: optional("benchmarks.http_overhead", quick),
    # 10 minutes at concurrency 16 on the bundled model: nothing lost, RSS flat (--quick: 60 s at 8)
    "soak": lambda quick: run_module("benchmarks.soak", *(["--quick"] if quick else [])),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(GROUPS), action="append")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    t0 = time.perf_counter()
    for name in args.only or GROUPS:
        GROUPS[name](args.quick)
    print(f"\nall benchmarks done in {time.perf_counter() - t0:.0f}s; results in {ROOT / 'benchmarks' / 'results'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
