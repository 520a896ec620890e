"""`kiln serve` and the worker token: its local workers always require one (handed over in their
environment, never on a command line), and a front end configured with a wrong token answers a
503 error object that says so, logged once at ERROR naming the worker. Real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest

from engine.worker import inference_pb2 as pb
from tests._server import API_KEY, MODEL, free_port, serve_process
from tests._workers import V2, start_workers, wait_for

TOKEN = "front-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"


def test_kiln_serve_gives_its_local_workers_a_token_they_require(tiny_package, tmp_path, monkeypatch):
    monkeypatch.delenv("KILN_WORKER_TOKEN", raising=False)  # none configured: one is generated
    live = serve_process(tiny_package("sd1"), tmp_path)
    try:
        (pid,) = live.worker_pids()
        environ = dict(
            entry.split(b"=", 1) for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in entry
        )
        token = environ[b"KILN_WORKER_TOKEN"]
        assert len(token) >= 16
        assert token not in Path(f"/proc/{pid}/cmdline").read_bytes()
        assert token.decode() not in live.log.read_text()

        v2 = V2(live.worker)
        with pytest.raises(grpc.RpcError) as refused:
            v2.ServerReady(pb.ServerReadyRequest(), timeout=10)
        v2.close()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        with live.client() as c:
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 200, r.text
    finally:
        live.stop()


def remote_config(package: Path, port: int, worker: str, images: Path, token: str) -> str:
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
local = 0
remote = ["{worker}"]
token = "{token}"

[images]
dir = "{images}"
"""


def test_a_wrong_worker_token_is_a_503_that_says_so_logged_once(tiny_package, tmp_path):
    workers = start_workers(tiny_package("sd1"), token=TOKEN)
    (worker,) = workers.addresses
    port = free_port()
    config = tmp_path / "kiln.toml"
    config.write_text(remote_config(tiny_package("sd1"), port, worker, tmp_path / "images", WRONG))
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "KILN_WORKER_TOKEN"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)],
                                env={**env, "KILN_API_KEYS": API_KEY, "PYTHONUNBUFFERED": "1"},
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: "Kiln is serving" in log.read_text() or proc.poll() is not None, 120), log.read_text()
        body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}]}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(2):
            r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert "worker token" in error["message"] and worker in error["message"]
            assert error["type"] == "server_error"
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
