"""Worker throughput and latency with step-level batching on and off, side by side.

One worker process per mode (started with LocalWorkers, one at a time so they never share the
CPU), driven through WorkerPool by a closed loop of `c` concurrent clients for c in 1, 4, 8, 16.
Reports images/s and p50/p95 latency per concurrency, as a table, JSON and a PNG chart under
benchmarks/results/. A third run (batching on) mixes in edits: every other request is an img2img
of a fixed picture at strength EDIT_STRENGTH, which starts at a later step and shares the UNet
batches of the text-to-image requests. Uses the bundled default model (models/kiln-shapes) when it is there, else
the tiny random-weight SD1 test package, and says which.

    python -m benchmarks.worker_throughput            # 256x256, 20 steps
    python -m benchmarks.worker_throughput --quick    # 4 steps, fewer requests: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import msgspec

from benchmarks.workloads import choose_package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PROMPTS = ["a red circle", "a blue square on the left", "two green triangles", "a yellow star above a circle"]
EDIT_STRENGTH = 0.6  # the engine's default for edits: 60 % of the steps


def edit_input(width: int, height: int) -> bytes:
    """The picture the mixed workload edits: a red disc on blue, as a PNG."""
    import io

    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[...] = (30, 60, 200)
    rgb[(x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2] = (220, 30, 30)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


def batch_ceiling(package: Path, size: str, max_batch: int, steps: int = 3) -> dict:
    """In-process: seconds per sample-step of one UNet call at batch 1 and at max_batch. Their ratio
    bounds what any batching scheduler can gain on this machine for this model."""
    from engine.pipeline import ImageRequest, Pipeline

    pipe = Pipeline(package)
    width, height = (int(v) for v in size.split("x"))
    per_sample = {}
    for batch in (1, max_batch):
        samples = pipe.prepare(
            [ImageRequest(prompt="a red circle", width=width, height=height, seed=k, steps=steps + 1) for k in range(batch)]
        )
        pipe.denoise_step(samples)  # session creation and first-call costs
        start = time.perf_counter()
        for _ in range(steps):
            pipe.denoise_step(samples)
        per_sample[batch] = (time.perf_counter() - start) / steps / batch
    return {
        "unet_s_per_sample_batch_1": per_sample[1],
        f"unet_s_per_sample_batch_{max_batch}": per_sample[max_batch],
        "speedup_ceiling": per_sample[1] / per_sample[max_batch],
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def drive(
    pool, model: str, width: int, height: int, steps: int, concurrency: int, requests: int, edits: bool = False
) -> dict:
    """`concurrency` clients each send their next request as soon as the last one is answered;
    with `edits`, every other request is an img2img edit."""
    from engine.client.types import ImageRequest

    latencies: list[float] = []
    issued = 0
    picture = edit_input(width, height) if edits else None

    async def client() -> None:
        nonlocal issued
        while issued < requests:
            k = issued
            issued += 1
            params = ImageRequest(
                model=model, prompt=PROMPTS[k % len(PROMPTS)], width=width, height=height, seed=1000 + k, steps=steps
            )
            if edits and k % 2:
                params = msgspec.structs.replace(params, image=picture, strength=EDIT_STRENGTH)
            start = time.perf_counter()
            await pool.generate(params, timeout=3600)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "seconds": wall,
        "images_per_s": requests / wall,
        "p50_s": percentile(latencies, 0.50),
        "p95_s": percentile(latencies, 0.95),
    }


async def measure_mode(package: Path, batching: bool, args, model_steps: int, edits: bool = False) -> tuple[list[dict], dict]:
    from engine.client.local import LocalWorkers
    from engine.client.pool import WorkerPool

    workers = LocalWorkers(
        [package],
        1,
        max_batch=args.max_batch,
        max_queue=max(64, max(args.concurrency)),
        warmup_sizes=[args.size],
        batching=batching,
        threads=args.threads,
        log_dir=ROOT / "build" / "logs" / "worker_throughput",
    )
    addresses = await workers.astart(600)
    rows = []
    try:
        async with WorkerPool(addresses) as pool:
            (model,) = await pool.models()
            width, height = (int(v) for v in args.size.split("x"))
            await drive(pool, model.name, width, height, model_steps, 1, 1)  # first-request costs out of the way
            for c in args.concurrency:
                requests = args.requests or (max(2, c) if args.quick else max(4, 2 * c))
                row = await drive(pool, model.name, width, height, model_steps, c, requests, edits)
                rows.append(row)
                print(
                    f"  batching {'on ' if batching else 'off'}{' half edits' if edits else ''} c={c:<3} {row['images_per_s']:6.2f} img/s  "
                    f"p50 {row['p50_s']:6.2f}s  p95 {row['p95_s']:6.2f}s",
                    flush=True,
                )
            worker_metrics = (await pool.metrics())[addresses[0]]
    finally:
        await workers.astop()
    return rows, worker_metrics


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style, colour in (("batching_on", "-o", "tab:blue"), ("batching_off", "--s", "tab:orange")):
        rows = result[mode]
        cs = [r["concurrency"] for r in rows]
        label = mode.replace("_", " ")
        left.plot(cs, [r["images_per_s"] for r in rows], style, color=colour, label=label)
        right.plot(cs, [r["p50_s"] for r in rows], style, color=colour, label=f"{label} p50")
        right.plot(cs, [r["p95_s"] for r in rows], style, color=colour, alpha=0.4, label=f"{label} p95")
    left.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    for ax, title, unit in ((left, "throughput", "images / s"), (right, "latency", "seconds")):
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_xticks(result["concurrency"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"kiln worker: {result['model_short']}, {result['size']}, {result['steps']} steps, max batch {result['max_batch']} "
        f"({result['machine']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=None, help="model package (default: the default model, else tiny SD1)")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; --quick: 4)")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=0, help="requests per concurrency (default 2c, at least 4)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads of the worker (0: its default)")
    parser.add_argument("--quick", action="store_true", help="4 steps, c requests per level: a smoke run")
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    steps = args.steps or (4 if args.quick else 20)

    package, what = choose_package(args.package)
    RESULTS.mkdir(exist_ok=True)
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, load {os.getloadavg()[0]:.1f} at start"
    print(f"worker throughput: {what}\n  package {package}, {args.size}, {steps} steps, max batch {args.max_batch}, {machine}")
    ceiling = batch_ceiling(package, args.size, args.max_batch)
    print(
        f"  engine alone: one UNet call costs {ceiling['unet_s_per_sample_batch_1'] * 1000:.0f} ms per sample at batch 1, "
        f"{ceiling[f'unet_s_per_sample_batch_{args.max_batch}'] * 1000:.0f} ms at batch {args.max_batch}: "
        f"batching can gain at most {ceiling['speedup_ceiling']:.2f}x here",
        flush=True,
    )
    result = {
        "model": what,
        "model_short": ("tiny SD1 (fallback)" if what.startswith("FALLBACK") else what),
        "batch_ceiling": ceiling,
        "package": str(package),
        "fallback": what.startswith("FALLBACK"),
        "size": args.size,
        "steps": steps,
        "max_batch": args.max_batch,
        "concurrency": args.concurrency,
        "quick": args.quick,
        "machine": machine,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    for batching, edits in ((True, False), (False, False), (True, True)):
        rows, worker_metrics = asyncio.run(measure_mode(package, batching, args, steps, edits))
        key = ("batching_on" if batching else "batching_off") + ("_half_edits" if edits else "")
        result[key] = rows
        result[f"{key}_worker_metrics"] = worker_metrics

    print(f"\n{'c':>3} | {'on img/s':>8} {'p50 s':>7} {'p95 s':>7} | {'off img/s':>9} {'p50 s':>7} {'p95 s':>7} | speed-up")
    for on, off in zip(result["batching_on"], result["batching_off"]):
        print(
            f"{on['concurrency']:>3} | {on['images_per_s']:>8.2f} {on['p50_s']:>7.2f} {on['p95_s']:>7.2f} | "
            f"{off['images_per_s']:>9.2f} {off['p50_s']:>7.2f} {off['p95_s']:>7.2f} | "
            f"{on['images_per_s'] / off['images_per_s']:>7.2f}x"
        )
    mean_batch = result["batching_on_worker_metrics"].get("mean_batch", 0.0)
    print(f"mean UNet batch with batching on: {mean_batch:.2f}")
    print(f"\nhalf the requests img2img edits at strength {EDIT_STRENGTH} (batching on), beside text-to-image only:")
    for on, mixed in zip(result["batching_on"], result["batching_on_half_edits"]):
        print(
            f"{on['concurrency']:>3} | text {on['images_per_s']:>6.2f} img/s p95 {on['p95_s']:>6.2f}s | "
            f"half edits {mixed['images_per_s']:>6.2f} img/s p95 {mixed['p95_s']:>6.2f}s | {mixed['images_per_s'] / on['images_per_s']:.2f}x"
        )
    mixed_batch = result["batching_on_half_edits_worker_metrics"].get("mean_batch", 0.0)
    print(f"mean UNet batch with half edits: {mixed_batch:.2f} (edits and text-to-image share UNet calls)")
    result["edit_strength"] = EDIT_STRENGTH
    stem = "worker_throughput" + ("_quick" if args.quick else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    chart(result, RESULTS / f"{stem}.png")
    print(f"wrote {RESULTS / f'{stem}.json'} and {RESULTS / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
