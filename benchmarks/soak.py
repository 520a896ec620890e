"""Soak: a long mixed load on `kiln serve`; nothing may be lost and memory must stay flat.

    python -m benchmarks.soak                                  # 10 minutes at concurrency 16, bundled model
    python -m benchmarks.soak --duration 60 --concurrency 8    # a shorter run
    python -m benchmarks.soak --url http://127.0.0.1:8000 --key K   # a server already running (no RSS)

Without --url it starts `kiln serve --model models/kiln-shapes --target cpu` on a free port (the
package is exported on first use), one local worker. Every client loops over a fixed mix until
the time is up: chat, chat with n=2, streaming chat, the Images API and, one request in ten, an
edit (/v1/images/edits). A request is *lost* when it gets no answer: a transport error, a client
timeout, or a stream that ends without `[DONE]`. The run passes when

  - no request is lost, and every status is 200 or a documented retryable one (429, 503);
  - the server's `kiln_http_requests_total` grew by exactly the client's count for every
    (route, status): the front end saw what the clients saw;
  - the resident memory (VmRSS from /proc, sampled every second) of the front end and of its
    worker grew by less than 5 % from the minute after the warm-up to the last minute.

Prints a table and writes benchmarks/results/soak.json; exits 1 when a check fails.
`tests/reliability/test_soak.py` runs the same load for 60 s on the tiny test model.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("soak")

CHAT = "/v1/chat/completions"
IMAGES = "/v1/images/generations"
EDITS = "/v1/images/edits"
# One request in ten is an edit; the rest spread over the chat and Images API shapes.
MIX = ("chat", "stream", "images", "chat_n2", "chat", "stream", "images", "chat_n2", "chat", "edit")
ROUTES = {"chat": CHAT, "chat_n2": CHAT, "stream": CHAT, "images": IMAGES, "edit": EDITS}
RETRYABLE = (429, 503)  # the error table's capacity statuses (Retry-After): a client retries them
PROMPTS = ("a red circle on a blue background", "a green square", "two yellow stars", "a purple triangle")
GROWTH_LIMIT = 0.05


@dataclass
class LoadResult:
    """What the clients saw."""

    duration_s: float
    concurrency: int
    answered: Counter = field(default_factory=Counter)  # (route, status) -> requests
    by_kind: Counter = field(default_factory=Counter)  # (kind, status) -> requests
    lost: list[str] = field(default_factory=list)  # why each unanswered request was lost
    latency_s: dict[str, list[float]] = field(default_factory=dict)  # kind -> seconds of its 200s

    @property
    def requests(self) -> int:
        return sum(self.answered.values()) + len(self.lost)

    @property
    def unexpected(self) -> dict[str, int]:
        """Answers that are neither 200 nor retryable, as "kind status" -> count."""
        return {f"{k} {s}": n for (k, s), n in sorted(self.by_kind.items()) if s != 200 and s not in RETRYABLE}

    def summary(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

        return {
            "duration_s": round(self.duration_s, 1),
            "concurrency": self.concurrency,
            "requests": self.requests,
            "requests_per_s": round(self.requests / self.duration_s, 2) if self.duration_s else 0.0,
            "lost": len(self.lost),
            "lost_examples": self.lost[:10],
            "statuses": {f"{k} {s}": n for (k, s), n in sorted(self.by_kind.items())},
            "unexpected": self.unexpected,
            "latency_s": {
                k: {"n": len(v), "p50": round(pct(v, 0.5), 3), "p95": round(pct(v, 0.95), 3), "max": round(max(v), 3)}
                for k, v in sorted(self.latency_s.items()) if v
            },
        }


def edit_picture(size: str) -> bytes:
    """The input picture of the edits: a red square on blue, PNG, at `size`."""
    from PIL import Image

    width, height = (int(v) for v in size.split("x"))
    image = Image.new("RGB", (width, height), (20, 40, 200))
    image.paste((220, 30, 30), (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


async def _one(client: httpx.AsyncClient, kind: str, k: int, extra: dict, picture: bytes) -> tuple[int, str | None]:
    """Send request `k` of this kind; (status, why it was lost or None)."""
    prompt = PROMPTS[k % len(PROMPTS)]
    if kind == "edit":
        form = {"model": "dall-e-2", "prompt": prompt, **{key: str(v) for key, v in extra.items()}}
        r = await client.post(EDITS, data=form, files={"image": ("in.png", picture, "image/png")})
        return r.status_code, None
    if kind == "images":
        r = await client.post(IMAGES, json={"model": "dall-e-2", "prompt": prompt, **extra})
        return r.status_code, None
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}], **extra}
    if kind == "chat_n2":
        body["n"] = 2
    if kind != "stream":
        r = await client.post(CHAT, json=body)
        return r.status_code, None
    async with client.stream("POST", CHAT, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        last = None
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                last = line[len("data: ") :]
        return 200, None if last == "[DONE]" else f"stream ended without [DONE] (last event: {str(last)[:80]})"


async def run_load(
    url: str,
    key: str,
    duration_s: float,
    concurrency: int,
    size: str | None = None,
    steps: int | None = None,
    timeout_s: float = 120.0,
    edit_size: str = "64x64",
) -> LoadResult:
    """`concurrency` clients, each sending the MIX in turn (offset by its number) until `duration_s`
    have passed; every request is answered or recorded as lost, none is left running."""
    extra = {k: v for k, v in (("size", size), ("steps", steps)) if v is not None}
    picture = edit_picture(size or edit_size)
    result = LoadResult(duration_s, concurrency)
    end = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client_loop(c: int, client: httpx.AsyncClient) -> None:
        k = c
        while time.monotonic() < end:
            kind = MIX[k % len(MIX)]
            t0 = time.perf_counter()
            try:
                status, lost = await _one(client, kind, k, extra, picture)
            except httpx.HTTPError as e:  # no answer: a transport error or the client's timeout
                result.lost.append(f"{kind}: {type(e).__name__}: {e}")
            else:
                result.answered[ROUTES[kind], status] += 1
                result.by_kind[kind, status] += 1
                if lost:
                    result.lost.append(f"{kind}: {lost}")
                elif status == 200:
                    result.latency_s.setdefault(kind, []).append(time.perf_counter() - t0)
            k += concurrency

    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(client_loop(c, client) for c in range(concurrency)))
    result.duration_s = time.monotonic() - t0
    return result


_SAMPLE = re.compile(r'^kiln_http_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def http_counts(url: str, method: str = "POST") -> Counter:
    """The front end's kiln_http_requests_total by (route, status) for `method`."""
    counts: Counter = Counter()
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if m := _SAMPLE.match(line):
            labels = dict(_LABEL.findall(m["labels"]))
            if labels.get("method") == method:
                counts[labels["route"], int(labels["status"])] += int(float(m["value"]))
    return counts


def counts_mismatch(client: Counter, before: Counter, after: Counter, routes=tuple(set(ROUTES.values()))) -> dict:
    """{"route status": (client count, server count)} where the server's delta differs from the clients'."""
    keys = {k for k in (*client, *after) if k[0] in routes}
    server = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return {f"{r} {s}": (client.get((r, s), 0), server[r, s]) for r, s in sorted(keys) if client.get((r, s), 0) != server[r, s]}


def settled_mismatch(url: str, client: Counter, before: Counter, timeout: float = 10.0) -> dict:
    """`counts_mismatch` once the front end has counted the last answers (it counts a request just
    after its last byte is sent, so the clients can be a moment ahead); {} when they agree."""
    end = time.monotonic() + timeout
    while True:
        mismatch = counts_mismatch(client, before, http_counts(url))
        if not mismatch or time.monotonic() > end:
            return mismatch
        time.sleep(0.1)


# ---- resident memory --------------------------------------------------------------------------


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


class RssSampler(threading.Thread):
    """Samples VmRSS of the front end and of its worker child every `interval` seconds."""

    def __init__(self, frontend: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.frontend, self.interval = frontend, interval
        self.samples: list[tuple[float, int | None, int | None, int | None]] = []  # (t, frontend, worker, worker pid)
        self._done = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            workers = children(self.frontend)
            worker = workers[0] if workers else None
            self.samples.append(
                (time.monotonic() - self.t0, rss_bytes(self.frontend), rss_bytes(worker) if worker else None, worker)
            )

    def stop(self) -> None:
        self._done.set()
        self.join(5)

    def growth(self, warmup_s: float, window_s: float) -> dict:
        """Per process: the median RSS of [warmup, warmup + window] against that of the last
        `window` seconds, and the growth between them."""
        end = self.samples[-1][0] if self.samples else 0.0
        out = {}
        for index, name in ((1, "frontend"), (2, "worker")):
            first = [s[index] for s in self.samples if warmup_s <= s[0] <= warmup_s + window_s and s[index]]
            last = [s[index] for s in self.samples if s[0] >= end - window_s and s[index]]
            if not first or not last:
                out[name] = {"error": "too few samples"}
                continue
            a, b = statistics.median(first), statistics.median(last)
            out[name] = {"after_warmup_mib": round(a / 2**20, 1), "last_mib": round(b / 2**20, 1),
                         "max_mib": round(max(s[index] or 0 for s in self.samples) / 2**20, 1), "growth": round(b / a - 1, 4)}
        out["worker_pids"] = sorted({s[3] for s in self.samples if s[3]})
        return out


# ---- the server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, log_path: Path, key: str, target: str = "cpu") -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "KILN_API_KEYS": key, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "kiln.cli", "serve", "--model", str(model), "--target", target, "--port", str(port)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 1800  # the first start exports the package
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"kiln serve exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"kiln serve was not ready in 30 minutes; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "kiln-shapes")
    parser.add_argument("--size", default="256x256", help="every request's size (the bundled model's native size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the RSS baseline (default: a fifth of the run)")
    parser.add_argument("--url", default=None, help="load this running server instead of starting one (no RSS)")
    parser.add_argument("--key", default=None, help="its API key (with --url)")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--quick", action="store_true", help="60 s at concurrency 8")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.concurrency = 60.0, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    warmup = args.warmup if args.warmup is not None else args.duration / 5
    window = min(60.0, (args.duration - warmup) / 3)

    proc = sampler = None
    url, key = args.url, args.key
    if url is None:
        key = "soak-" + secrets.token_urlsafe(12)
        server_log = ROOT / "build" / "soak" / "server.log"
        log.info("starting kiln serve --model %s (log: %s)", args.model, server_log)
        proc, url = start_server(args.model, server_log, key)
        sampler = RssSampler(proc.pid)
        sampler.start()
    try:
        log.info("load: %.0f s at concurrency %d on %s, size %s", args.duration, args.concurrency, url, args.size)
        before = http_counts(url)
        load = asyncio.run(run_load(url, key, args.duration, args.concurrency, args.size, args.steps, timeout_s=300))
        mismatch = settled_mismatch(url, load.answered, before)
        rss = sampler.growth(warmup, window) if sampler else {}
    finally:
        if sampler:
            sampler.stop()
        code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()

    report = {
        "command": "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": str(args.model) if args.url is None else None,
        "size": args.size,
        "load": load.summary(),
        "metrics_mismatch": mismatch,
        "rss": {**rss, "warmup_s": round(warmup, 1), "window_s": round(window, 1), "limit": GROWTH_LIMIT},
        "rss_samples": [(round(t, 1), f, w) for t, f, w, _ in sampler.samples[::10]] if sampler else [],
        "server_exit": code,
    }
    failures = []
    if load.lost:
        failures.append(f"{len(load.lost)} requests lost, e.g. {load.lost[0]}")
    if load.unexpected:
        failures.append(f"statuses other than 200/429/503: {load.unexpected}")
    if mismatch:
        failures.append(f"/metrics disagrees with the clients (client, server): {mismatch}")
    for name in ("frontend", "worker"):
        growth = rss.get(name, {}).get("growth")
        if growth is not None and growth >= GROWTH_LIMIT:
            failures.append(f"{name} RSS grew {growth:.1%} (limit {GROWTH_LIMIT:.0%})")
    if code not in (None, 0):
        failures.append(f"kiln serve exited with {code} after SIGTERM")
    report["failures"] = failures
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    s = report["load"]
    print(f"\nsoak: {s['requests']} requests in {s['duration_s']:.0f} s at concurrency {s['concurrency']} "
          f"({s['requests_per_s']}/s), lost {s['lost']}")
    for status, n in s["statuses"].items():
        print(f"  {status:<16} {n}")
    for kind, lat in s["latency_s"].items():
        print(f"  {kind:<8} p50 {lat['p50']:.2f} s  p95 {lat['p95']:.2f} s  max {lat['max']:.2f} s")
    for name in ("frontend", "worker"):
        if name in rss:
            r = rss[name]
            print(f"  RSS {name:<8} {r.get('after_warmup_mib')} -> {r.get('last_mib')} MiB "
                  f"(growth {r['growth']:+.2%}, max {r.get('max_mib')} MiB)" if "growth" in r else f"  RSS {name}: {r}")
    print(f"  /metrics vs clients: {'equal' if not mismatch else mismatch}")
    print("PASS" if not failures else "FAIL: " + "; ".join(failures))
    print(f"results in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
