"""Live front ends for the server tests: real processes and real loopback ports, no fakes.

`shared_server(package)` is THE server of the test session: `kiln serve --config` in a child
process, which starts one real engine worker process on the tiny random-weight sd1 package
(noise images, fine for the contract). Its limits keep every request cheap on a 2-core machine:
default size 64x64, at most 128 pixels a side, 2 steps by default, n <= 2, one sample per UNet
call and a queue of 2 images (so that a full queue is easy to reach on purpose).

`thread_server(config)` runs another front end in this process (uvicorn in a thread) with its own
settings, pointed at the shared worker or at an address where nothing listens.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
SECOND_KEY = "second-key-9876543210"
# The shared server's workers require this token, so that other front ends of a test can use them.
WORKER_TOKEN = "test-worker-token-0123456789"
MODEL = "sd1"
ALIASES = ("gpt-4o", "dall-e-3", "dall-e-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:] if log else ''}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} was not ready within {timeout:g} s:\n{log.read_text()[-4000:] if log else ''}")


def toml_config(package: Path, port: int, worker_port: int, images: Path, **limits) -> str:
    limit_lines = "\n".join(f"{k} = {v}" for k, v in {"max_n": 2, "max_steps": 150, "request_timeout_s": 60, **limits}.items())
    return f"""
[server]
host = "127.0.0.1"
port = {port}
max_body_bytes = 1048576  # 1 MiB, so the 413 test need not send the default's 32 MiB

[[models]]
name = "{MODEL}"
package = "{package}"
aliases = {list(ALIASES)!r}
default_size = "64x64"
default_steps = 2
max_side = 128

[workers]
local = 1
base_port = {worker_port}
threads = 1
max_batch = 1
max_queue = 2
warmup_sizes = ["64x64"]
start_timeout_s = 120

[images]
dir = "{images}"

[limits]
{limit_lines}
""".replace("'", '"')


@dataclass
class LiveServer:
    url: str
    key: str
    images: Path
    worker: str  # host:port of the engine worker behind it
    log: Path | None = None
    proc: subprocess.Popen | None = None
    stop_thread: object = None
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60, **kwargs)

    def openai(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=60, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        series = f"{name}{{{want}}}" if want else name
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def worker_pids(self) -> list[int]:
        """The pids of the `kiln serve` process's children (its local workers)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children]

    def wait_log(self, text: str, timeout: float) -> None:
        """Until `text` appears in the server's log (a log line is the event waited for)."""
        from tests._workers import wait_for

        logged = wait_for(lambda: text in self.log.read_text(errors="replace") or self.proc.poll() is not None, timeout)
        if not (logged and text in self.log.read_text(errors="replace")):
            raise AssertionError(f"{text!r} not logged within {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def wait_ready(self, timeout: float) -> None:
        wait_ready(self.url, timeout, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stop_thread is not None:
            self.stop_thread()


_SHARED: LiveServer | None = None


def shared_server(package: Path) -> LiveServer:
    """`kiln serve --config` with one real worker, started once per test session."""
    global _SHARED
    if _SHARED is not None:
        return _SHARED
    base = Path(tempfile.mkdtemp(prefix="kiln-server-test-"))  # config, log and images; removed at exit
    server = serve_process(package, base)
    atexit.register(lambda: (server.stop(), shutil.rmtree(base, ignore_errors=True)))
    _SHARED = server
    return server


def start_serve(base: Path, config: str, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """`kiln serve --config base/kiln.toml` (written from `config`) as a child process with
    `env` as its whole environment, logging to base/server.log; not waited for."""
    (base / "kiln.toml").write_text(config)
    log = base / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", "--config", str(base / "kiln.toml")],
            cwd=ROOT,
            env={**env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return proc, log


def serve_process(package: Path, base: Path, **limits) -> LiveServer:
    """A `kiln serve --config` child process of its own (config, log and images under `base`),
    ready when this returns; the caller stops it."""
    port, worker_port = free_port(), free_port()
    config = toml_config(package, port, worker_port, base / "images", **limits)
    env = {**os.environ, "KILN_API_KEYS": f"{API_KEY},{SECOND_KEY}", "KILN_WORKER_TOKEN": WORKER_TOKEN}
    proc, log = start_serve(base, config, env)
    url = f"http://127.0.0.1:{port}"
    server = LiveServer(url=url, key=API_KEY, images=base / "images", worker=f"127.0.0.1:{worker_port}", log=log, proc=proc)
    try:
        wait_ready(url, 180, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def thread_server(
    package: Path,
    worker: str,
    images: Path,
    server: dict | None = None,
    images_options: dict | None = None,
    uvicorn_options: dict | None = None,
    **limits,
) -> LiveServer:
    """Another front end (uvicorn in a thread of this process) on `worker`, with other settings.
    uvicorn runs with the options `kiln serve` gives it (server/http_limits.py), updated by
    `uvicorn_options`."""
    import asyncio

    import uvicorn

    from engine.client.pool import WorkerPool
    from server import http_limits
    from server.app import create_app
    from server.config import parse_config

    port = free_port()
    raw = {
        "server": {"port": port, **(server or {})},
        "auth": {"api_keys": [API_KEY]},
        "models": [
            {"name": MODEL, "package": str(package), "aliases": list(ALIASES), "default_size": "64x64", "default_steps": 2, "max_side": 128}
        ],
        "workers": {"local": 0, "remote": [worker]},
        "images": {"dir": str(images), **(images_options or {})},
        "limits": {"max_n": 2, "max_steps": 150, "retry_after_s": 3, **limits},
    }
    config = parse_config(raw, env={})
    pool = WorkerPool([worker], token=WORKER_TOKEN, probe_interval=0.2, probe_timeout=0.5)
    app = create_app(config, pool, close_engine=True)
    options = {**http_limits.uvicorn_options(config.server.max_header_bytes), **(uvicorn_options or {})}
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, **options))
    thread = threading.Thread(target=lambda: asyncio.run(uv.serve()), daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("the in-process front end did not start")
        time.sleep(0.02)

    def stop() -> None:
        uv.should_exit = True
        thread.join(15)

    return LiveServer(url=f"http://127.0.0.1:{port}", key=API_KEY, images=images, worker=worker, stop_thread=stop)
