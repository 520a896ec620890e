"""HTTP front-end overhead: one 256x256 image end to end over HTTP, against the engine alone.

Three ways to make the same image (same prompt, seed, size and steps), interleaved round by round
so that background load hits them alike:
  engine  -- `Pipeline.generate` in this process (no gRPC, no HTTP)
  worker  -- one `kiln worker` process through `WorkerPool.generate` (gRPC, PNG encoding)
  http    -- `POST /v1/chat/completions` to a `kiln serve` process in front of that same worker
             (auth, validation, the image stored and its URL returned), with httpx
Reports p50/p95 of each and the ratios to the engine; the goal is http p50 <= 1.10 x engine p50.
Uses the bundled default model when it is there, else the tiny random-weight SD1 test package,
and says which. Results: a table, and JSON under benchmarks/results/.

    python -m benchmarks.http_overhead            # 20 steps, 15 rounds
    python -m benchmarks.http_overhead --quick    # 4 steps, 5 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.workloads import choose_package

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
PROMPT = "a red circle on a blue background"
KEY = "bench-key-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(package: Path, worker: str, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = folder / "kiln.toml"
    config.write_text(
        f'[server]\nport = {port}\n[[models]]\nname = "bench"\npackage = "{package}"\ndefault_size = "256x256"\n'
        f'[workers]\nlocal = 0\nremote = ["{worker}"]\n[images]\ndir = "{folder / "images"}"\n'
        f"[limits]\nrequest_timeout_s = 3600\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)],
        cwd=ROOT,
        env={**os.environ, "KILN_API_KEYS": KEY},
        stdout=open(folder / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready within {timeout:g} s")


def summary(values: list[float]) -> dict:
    return {"p50_s": percentile(values, 0.5), "p95_s": percentile(values, 0.95), "n": len(values), "all_s": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default=None, help="model package (default: the bundled model's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 15)
    steps = args.steps or (4 if args.quick else 20)
    package, what = choose_package(args.package)
    print(f"model: {what}; 256x256, {steps} steps, {rounds} rounds", flush=True)

    import httpx

    from engine.client.local import LocalWorkers
    from engine.client.pool import WorkerPool
    from engine.client.types import ImageRequest
    from engine.manifest import read_manifest
    from engine.pipeline import ImageRequest, Pipeline

    name = read_manifest(package).name
    pipe = Pipeline(package)
    request = ImageRequest(prompt=PROMPT, width=256, height=256, seed=7, steps=steps)
    params = ImageRequest(model=name, prompt=PROMPT, width=256, height=256, seed=7, steps=steps)
    body = {"model": "bench", "messages": [{"role": "user", "content": PROMPT}], "size": "256x256", "seed": 7, "steps": steps}
    times: dict[str, list[float]] = {"engine": [], "worker": [], "http": []}

    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp, LocalWorkers([package], 1, max_batch=1, warmup_sizes=["256x256"]) as workers:
        proc, url = start_server(package, workers.addresses[0], Path(tmp))
        try:
            wait_ready(url, proc)
            client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=3600)

            async def run_rounds() -> None:
                pool = WorkerPool(workers.addresses)
                for k in range(rounds + 1):  # round 0 warms every path and is not counted
                    t = time.perf_counter()
                    pipe.generate([request])
                    engine_s = time.perf_counter() - t
                    t = time.perf_counter()
                    await pool.generate(params)
                    worker_s = time.perf_counter() - t
                    t = time.perf_counter()
                    r = await asyncio.to_thread(client.post, "/v1/chat/completions", json=body)
                    http_s = time.perf_counter() - t
                    r.raise_for_status()
                    if k:
                        times["engine"].append(engine_s)
                        times["worker"].append(worker_s)
                        times["http"].append(http_s)
                await pool.close()

            asyncio.run(run_rounds())
            client.close()
        finally:
            proc.terminate()
            proc.wait(30)

    result = {
        "model": what,
        "size": "256x256",
        "steps": steps,
        "rounds": rounds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        **{k: summary(v) for k, v in times.items()},
    }
    base = result["engine"]["p50_s"]
    result["http_over_engine_p50"] = result["http"]["p50_s"] / base
    result["worker_over_engine_p50"] = result["worker"]["p50_s"] / base
    print(f"\n{'path':8} {'p50 ms':>9} {'p95 ms':>9} {'x engine p50':>13}")
    for k in times:
        s = result[k]
        print(f"{k:8} {s['p50_s'] * 1000:9.1f} {s['p95_s'] * 1000:9.1f} {s['p50_s'] / base:13.3f}")
    goal = "met" if result["http_over_engine_p50"] <= 1.10 else "NOT met"
    print(f"goal http p50 <= 1.10 x engine p50: {goal} ({result['http_over_engine_p50']:.3f})")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"http_overhead{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
