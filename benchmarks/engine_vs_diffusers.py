"""Engine vs the diffusers PyTorch pipeline: time per image and peak RSS, side by side.

Each contender runs in its own process (so peak RSS is its own), the pair is repeated `--rounds`
times in alternation (the machine is shared and noisy), and the median of each is compared.
Engine variants show what each onnxruntime setting buys: dynamic shapes with basic graph
optimisation (plain onnxruntime), then fixed per-resolution shapes, then all optimisations.
With openvino installed, the openvino package (derived from the cpu one) runs too, in OpenVINO's
automatic precision (bf16 on CPUs with native bf16) and forced to fp32; `--variants` also times
diffusers in bf16, the same-precision baseline for the bf16 engine.

    python -m benchmarks.engine_vs_diffusers --checkpoint build/checkpoints/sd15-random \
        --package build/sd15-random/cpu --size 256x256 --steps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.workloads import openvino_sibling

RESULTS = Path(__file__).parent / "results"
PROMPT = "a red circle on a blue background"

DIFFUSERS = "diffusers (PyTorch fp32)"
DIFFUSERS_BF16 = "diffusers (PyTorch bf16)"
DEFAULT = "engine (fixed shapes, extended opt) = default"
OPENVINO_AUTO = "engine openvino (auto: bf16 here)"
OPENVINO_VARIANTS = {
    OPENVINO_AUTO: {"openvino_precision": "auto"},
    "engine openvino (f32)": {"openvino_precision": "f32"},
}
ENGINE_VARIANTS = {
    "engine (dynamic shapes, basic opt)": {"fixed_shapes": False, "optimization": "basic"},
    "engine (fixed shapes, basic opt)": {"fixed_shapes": True, "optimization": "basic"},
    DEFAULT: {"fixed_shapes": True, "optimization": "extended"},
    "engine (fixed shapes, all opt + NCHWc)": {"fixed_shapes": True, "optimization": "all"},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(package: str, width: int, height: int, steps: int, sampler: str, images: int, threads: int, options: dict) -> dict:
    from engine.pipeline import ImageRequest, Pipeline
    from engine.sessions import RuntimeOptions

    pipe = Pipeline(package, RuntimeOptions(threads=threads, **options))
    req = ImageRequest(prompt=PROMPT, width=width, height=height, seed=0, steps=steps, sampler=sampler)
    pipe.generate([req])  # warm-up: session creation and first-run allocations are excluded
    times = []
    for k in range(images):
        t0 = time.perf_counter()
        pipe.generate([ImageRequest(**{**_fields(req), "seed": k + 1})])
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_rss_mib": peak_rss_mib()}


def run_diffusers(checkpoint: str, width: int, height: int, steps: int, sampler: str, images: int, threads: int,
                  bf16: bool = False) -> dict:
    import torch

    from export.diffusers_reference import reference_pipeline

    torch.set_num_threads(threads or torch.get_num_threads())
    pipe = reference_pipeline(checkpoint, sampler)
    if bf16:
        pipe.to(dtype=torch.bfloat16)
    kwargs = dict(prompt=PROMPT, width=width, height=height, num_inference_steps=steps, output_type="np")
    with torch.inference_mode():
        pipe(**kwargs, generator=torch.Generator().manual_seed(0))
        times = []
        for k in range(images):
            t0 = time.perf_counter()
            pipe(**kwargs, generator=torch.Generator().manual_seed(k + 1))
            times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_rss_mib": peak_rss_mib()}


def _fields(req) -> dict:
    import msgspec

    return msgspec.structs.asdict(req)


def _child(kind: str, args: argparse.Namespace, options: dict | None = None, package: str | None = None) -> dict:
    """Run one contender in a fresh interpreter; it prints one JSON line."""
    payload = json.dumps({"kind": kind, "args": vars(args), "options": options or {}, "package": package or args.package})
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.engine_vs_diffusers", "--child", payload],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_main(payload: str) -> None:
    spec = json.loads(payload)
    a = spec["args"]
    width, height = (int(v) for v in a["size"].split("x"))
    if spec["kind"] == "diffusers":
        result = run_diffusers(a["checkpoint"], width, height, a["steps"], a["sampler"], a["images"], a["threads"],
                               **spec["options"])
    else:
        result = run_engine(spec["package"], width, height, a["steps"], a["sampler"], a["images"], a["threads"], spec["options"])
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default="build/test-cache/checkpoints/sd1")
    parser.add_argument("--package", default="build/test-cache/packages/sd1/cpu")
    parser.add_argument("--label", default=None, help="name of the workload in the results")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--images", type=int, default=2, help="timed images per contender per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", action="store_true", help="also time the engine's settings one by one")
    parser.add_argument("--no-openvino", action="store_true", help="skip the openvino package")
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0

    contenders: dict[str, tuple[str, dict, str | None]] = {DIFFUSERS: ("diffusers", {}, None)}
    if args.variants:
        contenders[DIFFUSERS_BF16] = ("diffusers", {"bf16": True}, None)
    variants = ENGINE_VARIANTS if args.variants else {DEFAULT: ENGINE_VARIANTS[DEFAULT]}
    contenders.update({name: ("engine", opts, None) for name, opts in variants.items()})
    openvino = None if args.no_openvino else openvino_sibling(Path(args.package))
    if openvino:
        contenders.update({name: ("engine", opts, str(openvino)) for name, opts in OPENVINO_VARIANTS.items()})
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, (kind, opts, package) in contenders.items():
            runs[name].append(_child(kind, args, opts, package))
            print(f"round {r + 1}/{args.rounds} {name}: {statistics.median(runs[name][-1]['seconds']):.3f} s/image", flush=True)

    def median_seconds(name: str) -> float:
        return statistics.median(t for run in runs[name] for t in run["seconds"])

    base = median_seconds(DIFFUSERS)
    rows = []
    for name, rs in runs.items():
        med = median_seconds(name)
        rss = max(run["peak_rss_mib"] for run in rs)
        rows.append({"contender": name, "median_s_per_image": med, "ratio_vs_diffusers": med / base, "peak_rss_mib": rss})
    label = args.label or Path(args.package).parent.name
    print(f"\n{label}: {args.size}, {args.steps} {args.sampler} steps, {args.threads} threads, "
          f"{args.rounds} rounds x {args.images} images each (medians)")
    print(f"{'contender':<40} {'s/image':>9} {'x diffusers':>12} {'peak RSS MiB':>13}")
    for row in rows:
        print(f"{row['contender']:<40} {row['median_s_per_image']:>9.3f} {row['ratio_vs_diffusers']:>12.2f} {row['peak_rss_mib']:>13.0f}")
    if DIFFUSERS_BF16 in runs and OPENVINO_AUTO in runs:
        print(f"same precision: engine openvino (auto) / diffusers bf16 = "
              f"{median_seconds(OPENVINO_AUTO) / median_seconds(DIFFUSERS_BF16):.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"engine_vs_diffusers_{label}_{args.size}.json"
    out.write_text(json.dumps({
        "workload": label, "size": args.size, "steps": args.steps, "sampler": args.sampler, "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "rows": rows, "date": time.strftime("%Y-%m-%d"),
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
