"""LoRAs served from one base package: memory per variant, time to a new LoRA's first image, and
the throughput of a stream that mixes LoRAs, each beside its no-LoRA baseline in the same run.

Three random rank-RANK LoRAs (kohya layout, fp16, as LoRA files are shipped) adapt every
attention and feed-forward Linear of the UNet and of the text encoder, as sd-scripts' defaults
do. They are stored with a hard-linked copy of the package (`kiln lora add`), so nothing is
written into the package measured.

  memory      (own process, for a clean RSS) base warm at one size, then a first and a second
              image with each LoRA: RSS before and after, against the bytes of the weights the
              variants changed (the goal: the extra within 1.2x the changed tensors)
  first image seconds to the first image with a LoRA never used before (its weights computed,
              its sessions built) vs a warm image of the base and of the same LoRA again
  mixed       one worker, `--clients` closed-loop clients: a stream cycling base, A, B, C vs all
              base, same requests otherwise (images/s, p50, p95)

    python -m benchmarks.lora                                  # the bundled model
    python -m benchmarks.lora --package build/sd15-random/cpu --size 256x256 --steps 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.workloads import choose_package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
RANK = 16
LORAS = ("alpha", "beta", "gamma")
# What sd-scripts' LoRA adapts by default: the Linear layers of the UNet's transformer blocks
# and of the text encoder's attention and MLP.
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te_"}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset, blobs = {}, 0, []
    for key, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {"float16": "F16", "float32": "F32"}[array.dtype.name]
        header[key] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for blob in blobs:
            f.write(blob)


def random_lora(package: Path, path: Path, seed: int) -> Path:
    """A kohya-layout LoRA of rank RANK on the package's own parameters (names from weights.json)."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for component, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        index = json.loads((package / component / "weights.json").read_text())
        for name, entry in index.items():
            param = entry.get("param", name)
            module = param.removesuffix(".weight")
            if not param.endswith(".weight") or not module.endswith(targets):
                continue
            shape = tuple(reversed(entry["shape"])) if entry.get("transposed") else tuple(entry["shape"])
            out_features, in_features = shape[0], shape[1]
            key = KOHYA[component] + module.replace(".", "_")
            down = rng.standard_normal((RANK, in_features, *shape[2:]), dtype=np.float32) / np.sqrt(in_features)
            up = rng.standard_normal((out_features, RANK, *([1] * (len(shape) - 2))), dtype=np.float32) * 0.02
            tensors[f"{key}.lora_down.weight"] = down.astype(np.float16)
            tensors[f"{key}.lora_up.weight"] = up.astype(np.float16)
            tensors[f"{key}.alpha"] = np.array(RANK, np.float16)
    if not tensors:
        raise SystemExit(f"{package}: no LoRA target found (exported before Kiln recorded parameter names? re-export it)")
    write_safetensors(path, tensors)
    return path


def package_with_loras(package: Path, work: Path) -> Path:
    """A hard-linked copy of `package` (nothing copied, nothing written into it) with the LoRAs stored."""
    from engine.lora import add_lora

    copy = work / package.name
    shutil.copytree(package, copy, copy_function=os.link)
    for k, name in enumerate(LORAS):
        add_lora(copy, random_lora(copy, work / f"{name}.safetensors", seed=k), name)
    return copy


# ---- memory and first images (own process) ---------------------------------------------


def measure_memory(package: Path, size: str, steps: int) -> dict:
    from engine.pipeline import Pipeline
    from engine.request import ImageRequest, LoraChoice
    from engine.sessions import RuntimeOptions

    width, height = (int(v) for v in size.split("x"))
    pipe = Pipeline(package, RuntimeOptions(max_sessions=len(LORAS) + 1))

    def image(loras=()) -> float:
        start = time.perf_counter()
        pipe.generate([ImageRequest(prompt="a lighthouse", width=width, height=height, seed=1, steps=steps, loras=loras)])
        return time.perf_counter() - start

    def changed_bytes() -> int:
        return sum(c.variant_bytes() for c in (*pipe.text_encoders, pipe.unet))

    image()  # base sessions built, arenas sized
    base_warm = image()
    gc.collect()
    rss_base = rss_mib()
    rows = []
    for name in LORAS:
        choice = (LoraChoice(name=name, scale=0.8),)
        first = image(choice)
        again = image(choice)
        gc.collect()
        rows.append({"lora": name, "first_image_s": first, "warm_image_s": again, "rss_mib": rss_mib(),
                     "changed_mib": changed_bytes() / 2**20})
    extra = rows[-1]["rss_mib"] - rss_base
    changed = rows[-1]["changed_mib"]
    return {
        "rss_base_mib": rss_base,
        "base_warm_image_s": base_warm,
        "loras": rows,
        "extra_mib": extra,
        "changed_mib": changed,
        "extra_over_changed": extra / changed if changed else float("nan"),
        "unet_weights_mib": sum(a.nbytes for a in pipe.unet.weights.arrays.values()) / 2**20,
    }


# ---- a mixed stream through a worker ---------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(pool, model: str, width: int, height: int, steps: int, clients: int, requests: int, mixed: bool) -> dict:
    from engine.request import ImageRequest, LoraChoice

    choices = [()] + [(LoraChoice(name=n, scale=0.8),) for n in LORAS]
    latencies: list[float] = []
    issued = 0

    async def client() -> None:
        nonlocal issued
        while issued < requests:
            k = issued
            issued += 1
            loras = choices[k % len(choices)] if mixed else ()
            params = ImageRequest(model=model, prompt="a lighthouse", width=width, height=height, seed=k, steps=steps, loras=loras)
            start = time.perf_counter()
            await pool.generate(params, timeout=3600)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"mixed": mixed, "requests": requests, "seconds": wall, "images_per_s": requests / wall,
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95)}


async def measure_stream(package: Path, size: str, steps: int, clients: int, requests: int, max_batch: int) -> list[dict]:
    from engine.client.local import LocalWorkers
    from engine.client.pool import WorkerPool

    workers = LocalWorkers([package], 1, max_batch=max_batch, max_queue=64, warmup_sizes=[size],
                           log_dir=ROOT / "build" / "logs" / "lora_bench")
    addresses = await workers.astart(900)
    width, height = (int(v) for v in size.split("x"))
    rows = []
    try:
        async with WorkerPool(addresses) as pool:
            (model,) = await pool.models()
            # every variant's sessions built before timing: this measures serving, not first use
            await drive(pool, model.name, width, height, 1, 4, 4, mixed=True)
            for mixed in (False, True, False, True):  # interleaved: the machine's load drifts
                rows.append(await drive(pool, model.name, width, height, steps, clients, requests, mixed))
                r = rows[-1]
                print(f"  {'mixed' if mixed else 'base '} {r['images_per_s']:.3f} img/s  p50 {r['p50_s']:.2f}s  p95 {r['p95_s']:.2f}s", flush=True)
    finally:
        await workers.astop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="a cpu package (default: the bundled model)")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16, help="per stream")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="64x64, 2 steps, 8 requests")
    parser.add_argument("--memory-only", help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args(argv)
    if args.memory_only:
        print(json.dumps(measure_memory(Path(args.memory_only), args.size, args.steps)))
        return 0
    if args.quick:
        args.size, args.steps, args.requests = "64x64", 2, 8
    package, what = choose_package(args.package)
    print(f"LoRA benchmark on {what}: {args.size}, {args.steps} steps, rank {RANK}, {len(LORAS)} LoRAs", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-lora-bench-", dir=ROOT / "build") as work:
        served = package_with_loras(package, Path(work))
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.lora", "--memory-only", str(served), "--size", args.size, "--steps", str(args.steps)],
            cwd=ROOT, capture_output=True, text=True, check=True,
        )
        memory = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"  RSS base {memory['rss_base_mib']:.0f} MiB; +3 LoRA variants {memory['extra_mib']:+.0f} MiB for "
              f"{memory['changed_mib']:.0f} MiB of changed weights: {memory['extra_over_changed']:.2f}x "
              f"(UNet weights {memory['unet_weights_mib']:.0f} MiB)")
        for r in memory["loras"]:
            print(f"  {r['lora']}: first image {r['first_image_s']:.2f}s, again {r['warm_image_s']:.2f}s "
                  f"(base warm {memory['base_warm_image_s']:.2f}s), RSS {r['rss_mib']:.0f} MiB")
        stream = asyncio.run(measure_stream(served, args.size, args.steps, args.clients, args.requests, args.max_batch))
    base = statistics.median(r["images_per_s"] for r in stream if not r["mixed"])
    mixed = statistics.median(r["images_per_s"] for r in stream if r["mixed"])
    print(f"  mixed stream / base stream: {mixed / base:.2f}x images/s ({mixed:.3f} vs {base:.3f})")
    result = {
        "package": what, "size": args.size, "steps": args.steps, "rank": RANK, "clients": args.clients,
        "max_batch": args.max_batch, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "memory": memory, "stream": stream, "mixed_over_base": mixed / base,
    }
    RESULTS.mkdir(exist_ok=True)
    name = "lora_quick.json" if args.quick else f"lora_{Path(package).parent.name}_batch{args.max_batch}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {RESULTS / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
