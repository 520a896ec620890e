"""The session cache, side by side: resident memory over 30 sizes with and without the bound, and
the latency of concurrent requests at a warm size while new sizes are built, with the builds on
the background thread or on the scheduler thread.

Every mode runs in its own process (so resident memory is the mode's own), one at a time, with
the modes alternated over `--rounds`. A process is what `kiln worker` runs minus gRPC: a Pipeline
and a started Scheduler, warmed up (and so pinned) at 256x256 (engine/worker/server.py).

  memory:  `--sizes` requests, each at a size not seen before, submitted at once; resident
           memory sampled every 50 ms and after each request finishes. Modes: the bound
           (`--max-sessions`), and no bound (as before the cache: a session per size, kept).
  latency: `--clients` closed-loop clients at the warm 256x256 (`--requests` each), while
           another client asks for a new size after each of its requests finishes, with
           `--new-steps` steps (default 1: what a new size costs the others is then its build,
           not the UNet calls it shares with them, which are the same in every mode). p50/p95/max
           of the 256x256 requests, against the same clients with no new sizes, and the longest
           gap between two of their steps (a build on the scheduler thread stalls them for its
           whole length; on the background thread it only shares the cores).

    python -m benchmarks.session_cache --package build/kiln-shapes/cpu
    python -m benchmarks.session_cache --package build/kiln-shapes/cpu --only latency --rounds 3
    python -m benchmarks.session_cache --package build/kiln-shapes/cpu --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
WARM = (256, 256)
PROMPT = "a red circle on a blue background"

MEMORY_MODES = {
    "bounded": {"bounded": True},
    "unbounded (before)": {"bounded": False},
}
LATENCY_MODES = {
    "256x256 only": {"new_sizes": False, "background": True},
    "+ new sizes, background builds": {"new_sizes": True, "background": True},
    "+ new sizes, built on the scheduler thread (before)": {"new_sizes": True, "background": False},
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def new_sizes(package: Path, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` request sizes that each draw at a latent shape of their own, none the warm one's."""
    from engine.manifest import read_manifest
    from engine.shapes import render_size

    limits = read_manifest(package).sizes
    sides = range(limits.min_side, min(limits.max_side, 512) + 1, limits.multiple_of)
    drawn_warm = render_size(*WARM, limits)
    by_drawn: dict[tuple[int, int], tuple[int, int]] = {}
    for w in sides:
        for h in sides:
            drawn = render_size(w, h, limits)
            if drawn != drawn_warm:
                by_drawn.setdefault(drawn, (w, h))
    sizes = sorted(by_drawn.values())
    random.Random(seed).shuffle(sizes)
    if len(sizes) < count:
        raise SystemExit(f"{package} draws only {len(sizes)} distinct sizes up to 512 px; ask for fewer --sizes")
    return sizes[:count]


# ---- one mode, in its own process -------------------------------------------------------


class Serving:
    """A Pipeline and a started Scheduler, warmed up at 256x256: a worker without gRPC."""

    def __init__(self, package: Path, threads: int, max_sessions: int, background: bool, max_batch: int):
        from engine.pipeline import Pipeline
        from engine.sessions import RuntimeOptions
        from engine.worker.scheduler import Scheduler

        options = RuntimeOptions(threads=threads, max_sessions=max_sessions, background_builds=background)
        self.pipe = Pipeline(package, options)
        self.model = self.pipe.manifest.name
        self.scheduler = Scheduler({self.model: self.pipe}, max_batch=max_batch, max_queue=256)
        self.scheduler.warm_up(self.model, *WARM, max_batch)
        self.scheduler.start()

    def submit(self, width: int, height: int, steps: int, seed: int, on_done, on_step=None) -> None:
        """Queue one request; on_done(seconds, error or None) from the scheduler's threads, and
        on_step(time) after each of its steps when given."""
        from engine.request import ImageRequest
        from engine.worker.scheduler import Job, JobFailed, JobResult

        request = self.pipe.resolve(ImageRequest(prompt=PROMPT, width=width, height=height, seed=seed, steps=steps))
        start = time.perf_counter()

        def sink(event) -> None:
            if isinstance(event, (JobResult, JobFailed)):
                on_done(time.perf_counter() - start, getattr(event, "error", None))
            elif on_step is not None:
                on_step(time.perf_counter())

        key = self.scheduler.key_for(self.model, width, height)
        self.scheduler.submit(Job(self.model, request, key, 1, sink, progress=on_step is not None))

    def run(self, width: int, height: int, steps: int, seed: int, on_step=None) -> float:
        """One request, waited for; its seconds."""
        done = threading.Event()
        result: list = []
        self.submit(width, height, steps, seed, lambda seconds, error: (result.append((seconds, error)), done.set()), on_step)
        done.wait()
        seconds, error = result[0]
        if error is not None:
            raise error
        return seconds

    def sessions(self) -> dict:
        counters, gauges = self.scheduler.metrics()
        return {
            "cached": gauges["sessions_cached"],
            "pinned": gauges["sessions_pinned"],
            "builds": counters["session_builds"],
            "evictions": counters["session_evictions"],
        }


def memory_child(args, mode: dict) -> dict:
    sizes = new_sizes(args.package, args.sizes)
    serving = Serving(args.package, args.threads, args.max_sessions if mode["bounded"] else 10_000, True, args.max_batch)
    start = time.perf_counter()
    samples: list[tuple[float, float]] = [(0.0, rss_mib())]
    finished: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append((time.perf_counter() - start, rss_mib()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    left = threading.Semaphore(0)
    errors: list = []

    def done(seconds: float, error) -> None:
        finished.append((time.perf_counter() - start, rss_mib()))
        if error is not None:
            errors.append(str(error))
        left.release()

    for k, (w, h) in enumerate(sizes):
        serving.submit(w, h, args.steps, k, done)
    for _ in sizes:
        left.acquire()
    stop.set()
    sampler.join()
    return {
        "after_warm_up_mib": samples[0][1],
        "peak_mib": max(r for _, r in samples),
        "final_mib": finished[-1][1],
        "seconds": time.perf_counter() - start,
        "rss_after_each_request_mib": [round(r, 1) for _, r in finished],
        "rss_over_time": [(round(t, 2), round(r, 1)) for t, r in samples[:: max(1, len(samples) // 60)]],
        "sessions": serving.sessions(),
        "errors": errors,
    }


def latency_child(args, mode: dict) -> dict:
    sizes = new_sizes(args.package, args.sizes)
    serving = Serving(args.package, args.threads, args.max_sessions, mode["background"], args.max_batch)
    warm_latencies: list[float] = []
    new_latencies: list[float] = []
    steps_at: list[float] = []  # when a step of a 256x256 request ended (one per request per step)
    clients_done = threading.Event()
    build_s = time_builds(serving.pipe)

    def warm_client(c: int) -> None:
        for k in range(args.requests):
            warm_latencies.append(serving.run(*WARM, args.steps, seed=1000 * c + k, on_step=steps_at.append))

    def new_size_client() -> None:
        for k, (w, h) in enumerate(sizes):
            if clients_done.is_set():
                return
            new_latencies.append(serving.run(w, h, args.new_steps, seed=k))

    clients = [threading.Thread(target=warm_client, args=(c,)) for c in range(args.clients)]
    other = threading.Thread(target=new_size_client)
    start = time.perf_counter()
    if mode["new_sizes"]:
        other.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    seconds = time.perf_counter() - start
    clients_done.set()
    if mode["new_sizes"]:
        other.join()
    ordered = sorted(steps_at)
    gaps = [b - a for a, b in zip(ordered, ordered[1:])]
    return {
        "max_step_gap_s": max(gaps),
        "p99_step_gap_s": percentile(gaps, 0.99),
        "warm_p50_s": statistics.median(warm_latencies),
        "warm_p95_s": percentile(warm_latencies, 0.95),
        "warm_max_s": max(warm_latencies),
        "warm_requests": len(warm_latencies),
        "seconds": seconds,
        "new_sizes_served": len(new_latencies),
        "new_size_p50_s": statistics.median(new_latencies) if new_latencies else None,
        "build_s_on_scheduler_thread": build_s.get("kiln-scheduler", 0.0),
        "build_s_on_builder_thread": build_s.get("kiln-session-build", 0.0),
        "sessions": serving.sessions(),
    }


def time_builds(pipe) -> dict[str, float]:
    """Seconds spent building sessions from now on, by the kind of thread that built them."""
    seconds: dict[str, float] = {}
    for component in (pipe.unet, pipe.vae, pipe.vae_encoder):
        real = component._create

        def timed(dims, real=real):
            start = time.perf_counter()
            try:
                return real(dims)
            finally:
                thread = threading.current_thread().name.rsplit("_", 1)[0]
                seconds[thread] = seconds.get(thread, 0.0) + time.perf_counter() - start

        component._create = timed
    return seconds


# ---- the parent: modes alternated, one process each -------------------------------------


def run_child(args, kind: str, mode: str) -> dict:
    argv = [sys.executable, "-m", "benchmarks.session_cache", "--child", kind, "--mode", mode, *args.passthrough]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"{kind} / {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package", type=Path, default=Path("build/kiln-shapes/cpu"))
    p.add_argument("--sizes", type=int, default=30, help="new sizes asked for (default 30)")
    p.add_argument("--max-sessions", type=int, default=4, help="RuntimeOptions.max_sessions of the bounded modes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--new-steps", type=int, default=1, help="steps of the new-size requests (latency)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--clients", type=int, default=4, help="concurrent 256x256 clients (latency)")
    p.add_argument("--requests", type=int, default=12, help="requests per 256x256 client (latency)")
    p.add_argument("--rounds", type=int, default=2, help="times every mode runs, alternated")
    p.add_argument("--only", choices=("memory", "latency"), default=None)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 sizes, 4 steps, 1 round")
    p.add_argument("--child", choices=("memory", "latency"), help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.steps, args.rounds, args.requests = 8, 4, 1, 4
    if args.child:
        modes = MEMORY_MODES if args.child == "memory" else LATENCY_MODES
        child = memory_child if args.child == "memory" else latency_child
        print(json.dumps(child(args, modes[args.mode])))
        return 0

    args.passthrough = [
        "--package", str(args.package), "--sizes", str(args.sizes), "--max-sessions", str(args.max_sessions),
        "--steps", str(args.steps), "--new-steps", str(args.new_steps), "--threads", str(args.threads), "--max-batch", str(args.max_batch),
        "--clients", str(args.clients), "--requests", str(args.requests),
    ]
    machine = f"{os.cpu_count()} CPUs, {platform.machine()}, load {os.getloadavg()[0]:.1f} at start"
    print(f"{args.package}: {args.sizes} new sizes, max_sessions {args.max_sessions}, {args.steps} steps; {machine}")
    kinds = [k for k in ("memory", "latency") if args.only in (None, k)]
    runs: dict[str, dict[str, list[dict]]] = {k: {} for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            for mode in MEMORY_MODES if kind == "memory" else LATENCY_MODES:
                result = run_child(args, kind, mode)
                runs[kind].setdefault(mode, []).append(result)
                if kind == "memory":
                    print(
                        f"  round {r + 1} memory  {mode:<52} warm {result['after_warm_up_mib']:6.0f} MiB  "
                        f"peak {result['peak_mib']:6.0f}  final {result['final_mib']:6.0f}  "
                        f"sessions {result['sessions']['cached']:.0f}  evictions {result['sessions']['evictions']}  "
                        f"{result['seconds']:.1f}s"
                    )
                else:
                    print(
                        f"  round {r + 1} latency {mode:<52} 256x256 p50 {result['warm_p50_s']:.2f}s  "
                        f"p95 {result['warm_p95_s']:.2f}s  max {result['warm_max_s']:.2f}s  "
                        f"longest step gap {result['max_step_gap_s']:.2f}s  new sizes served {result['new_sizes_served']}  "
                        f"building on the scheduler thread {result['build_s_on_scheduler_thread']:.1f}s, "
                        f"in the background {result['build_s_on_builder_thread']:.1f}s"
                    )
    summary = summarise(runs)
    for line in summary["lines"]:
        print(line)
    RESULTS.mkdir(exist_ok=True)
    suffix = (f"_{args.only}" if args.only else "") + ("_quick" if args.quick else "")
    out = RESULTS / f"session_cache_{args.package.parent.name}_{args.package.name}{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "package": str(args.package),
                "machine": machine,
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "settings": {k: getattr(args, k) for k in ("sizes", "max_sessions", "steps", "new_steps", "threads", "max_batch", "clients", "requests", "rounds")},
                "summary": {k: v for k, v in summary.items() if k != "lines"},
                "runs": runs,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")
    return 0


def summarise(runs: dict) -> dict:
    """Medians over rounds, and the ratios the README quotes."""
    out: dict = {"lines": []}
    if "memory" in runs:
        memory = {mode: {k: statistics.median(r[k] for r in rs) for k in ("after_warm_up_mib", "peak_mib", "final_mib")} for mode, rs in runs["memory"].items()}
        out["memory"] = memory
        bounded, unbounded = memory["bounded"], memory["unbounded (before)"]
        grown = {mode: m["peak_mib"] - m["after_warm_up_mib"] for mode, m in memory.items()}
        out["memory_growth_mib"] = grown
        out["lines"].append(
            f"memory: peak {bounded['peak_mib']:.0f} MiB bounded vs {unbounded['peak_mib']:.0f} MiB unbounded "
            f"(growth over warm-up {grown['bounded']:.0f} vs {grown['unbounded (before)']:.0f} MiB, "
            f"{grown['bounded'] / grown['unbounded (before)']:.2f}x)"
        )
    if "latency" in runs:
        keys = ("warm_p50_s", "warm_p95_s", "warm_max_s", "max_step_gap_s", "p99_step_gap_s")
        latency = {mode: {k: statistics.median(r[k] for r in rs) for k in keys} for mode, rs in runs["latency"].items()}
        out["latency"] = latency
        base = latency["256x256 only"]["warm_p95_s"]
        ratios = {mode: v["warm_p95_s"] / base for mode, v in latency.items()}
        out["p95_vs_256_only"] = ratios
        for mode, ratio in ratios.items():
            out["lines"].append(
                f"latency: {mode:<52} p95 {latency[mode]['warm_p95_s']:.2f}s = {ratio:.2f}x the 256x256-only p95; "
                f"longest gap between steps {latency[mode]['max_step_gap_s']:.2f}s"
            )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
