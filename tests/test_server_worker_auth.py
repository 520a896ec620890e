"""`kiln serve` and the worker token: its local workers always require one (handed over in their
environment, never on a command line), and a front end configured with a wrong token answers a
503 error object that says so, logged once at ERROR naming the worker. Real processes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest

from engine.worker import inference_pb2 as pb
from tests._server import API_KEY, MODEL, free_port, start_serve
from tests._workers import V2, start_workers, wait_for

TOKEN = "front-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"


def serve(base: Path, config: str) -> tuple[subprocess.Popen, Path]:
    """`kiln serve --config` with `config`, without KILN_WORKER_TOKEN in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "KILN_WORKER_TOKEN"}
    return start_serve(base, config, {**env, "KILN_API_KEYS": API_KEY})


def wait_serving(proc: subprocess.Popen, log: Path) -> None:
    """Until the banner is printed (the front end listens; /ready may say no worker is ready)."""
    assert wait_for(lambda: "Kiln is serving" in log.read_text() or proc.poll() is not None, 180), log.read_text()
    assert proc.poll() is None, log.read_text()


def config(package: Path, port: int, images: Path, workers: str) -> str:
    """A kiln.toml serving the tiny model at 64x64 in 2 steps, with the given [workers] lines."""
    return f"""
[server]
host = "127.0.0.1"
port = {port}

[[models]]
name = "{MODEL}"
package = "{package}"
default_size = "64x64"
default_steps = 2

[workers]
{workers}

[images]
dir = "{images}"
"""


LOCAL_WORKER = """local = 1
threads = 1
max_batch = 1
warmup_sizes = ["64x64"]"""


def remote_worker(address: str, token: str) -> str:
    return f'local = 0\nremote = ["{address}"]\ntoken = "{token}"'


def test_kiln_serve_gives_its_local_workers_a_generated_token_they_require(tiny_package, tmp_path):
    port = free_port()
    proc, log = serve(tmp_path, config(tiny_package("sd1"), port, tmp_path / "images", LOCAL_WORKER))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, log)
        (pid,) = (int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        environ = dict(
            entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry
        )
        token = environ[b"KILN_WORKER_TOKEN"]  # none configured: generated at this start
        assert len(token) >= 16
        assert token not in Path(f"/proc/{pid}/cmdline").read_bytes()

        (worker,) = re.findall(r"local worker\(s\) ready: (\S+)", log.read_text())
        v2 = V2(worker)
        with pytest.raises(grpc.RpcError) as refused:
            v2.ServerReady(pb.ServerReadyRequest(), timeout=10)
        v2.close()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}]}
        r = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(60)
    assert token.decode() not in log.read_text()


def test_a_wrong_worker_token_is_a_503_that_says_so_logged_once(tiny_package, tmp_path):
    workers = start_workers(tiny_package("sd1"), token=TOKEN)
    (worker,) = workers.addresses
    port = free_port()
    proc, log = serve(tmp_path, config(tiny_package("sd1"), port, tmp_path / "images", remote_worker(worker, WRONG)))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(proc, log)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}]}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(2):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert "worker token" in error["message"] and worker in error["message"]
            assert error["type"] == "server_error" and error["code"] == "worker_auth_failed"
            # A configuration error: clients are told not to retry, and no Retry-After invites them to.
            assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
            assert httpx.get(url + "/ready", timeout=10).status_code == 503
            assert httpx.get(url + "/metrics", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)
        workers.stop()
    text = log.read_text()
    errors = [line for line in text.splitlines() if " ERROR " in line and "refused the worker token" in line]
    assert len(errors) == 1 and worker in errors[0], text
    assert TOKEN not in text and WRONG not in text
