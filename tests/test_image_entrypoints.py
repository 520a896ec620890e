"""The container images' commands, run here as plain processes (no container engine in CI).

The Containerfile's export stage builds the bundled model's CPU package with `kiln export`; its
serving stage runs `kiln worker` (the CMD) and `kiln serve` with no torch installed. Here: the same
commands, with /models a temporary folder, torch made unimportable for the serving commands,
the worker on a non-loopback listen address (so it needs its token), and the front end on the
Kubernetes ConfigMap's kiln.toml (deploy/kubernetes/base/kiln.toml), its dns:/// name pointed at
the worker. What is not tested: building the image itself (no registry to pull its base from).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.default_model import DEFAULT_MODEL
from tests._server import ROOT, free_port, wait_ready
from tests._workers import wait_for

CONTAINERFILE = ROOT / "Containerfile"
TOKEN = "image-entrypoint-token-0123456789"
API_KEY = "image-key-0123456789"
NO_TORCH = """
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not in the serving image")
sys.meta_path.insert(0, _NoTorch())
"""


def stages() -> dict[str, list[str]]:
    """Containerfile stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", CONTAINERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM \S+ AS (\S+)", line)
        if m:
            current = m[1]
            out[current] = []
        elif current:
            out[current].append(line)
    return out


def instruction(stage: list[str], name: str) -> str:
    found = [line.split(" ", 1)[1] for line in stage if line.startswith(name + " ")]
    assert found, f"no {name}"
    return found[-1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """/models as the export stage leaves it: the export stage's own `kiln export` command."""
    run = " ".join(l for l in stages()["export"] if l.startswith("RUN "))
    command = re.search(r"kiln export (\S+) --target (\S+) --out (\S+);", run)
    assert command, "the export stage runs kiln export"
    checkpoint, target, out = command.groups()
    assert (checkpoint, target, out) == ("/opt/kiln/checkpoints/kiln-shapes", "cpu", "/models")
    models = tmp_path_factory.mktemp("models")
    env = {**os.environ, "KILN_HOME": str(models)}
    done = subprocess.run([sys.executable, "-m", "kiln.cli", "export", str(DEFAULT_MODEL), "--target", target, "--out", str(models)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return models


def test_the_images_run_kiln_as_an_unprivileged_user():
    for name in ("serving", "serving-cuda", "export"):
        stage = stages()[name]
        assert json.loads(instruction(stage, "ENTRYPOINT")) == ["kiln"], name
        assert instruction(stage, "USER") == "kiln", name
    serving = " ".join(stages()["serving"])
    assert "[cpu]" in serving and "export" not in serving.split("COPY --from=export")[0], "no torch in the serving image"
    assert "[gpu]" in " ".join(stages()["serving-cuda"])


def test_the_export_stage_builds_the_package_the_serving_image_copies(models):
    copy = next(l for l in stages()["serving"] if l.startswith("COPY --from=export"))
    assert copy.split()[-2:] == ["/models/kiln-shapes", "/models/kiln-shapes"]
    manifest = json.loads((models / "kiln-shapes" / "cpu" / "manifest.json").read_text())
    assert manifest["name"] == "kiln-shapes"


def test_the_serving_commands_run_without_torch_and_serve_an_image(models, tmp_path):
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}", "KILN_HOME": str(models), "PYTHONUNBUFFERED": "1"}
    env.pop("KILN_WORKER_TOKEN", None)

    # The serving image's CMD, with /models here and a free port; 0.0.0.0 needs the token.
    cmd = json.loads(instruction(stages()["serving"], "CMD"))
    port = free_port()
    cmd = [c.replace("/models", str(models)).replace("0.0.0.0:9000", f"0.0.0.0:{port}") for c in cmd]
    refused = subprocess.run([sys.executable, "-m", "kiln.cli", *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "token" in refused.stderr, "a worker beyond loopback refuses to start without a token"

    ready = tmp_path / "ready"
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "kiln.cli", *cmd, "--ready-file", str(ready), "--threads", "1",
                                   "--warmup-size", "64x64"], cwd=ROOT, env={**env, "KILN_WORKER_TOKEN": TOKEN},
                                  stdout=out, stderr=subprocess.STDOUT)
    serve = None
    try:
        assert wait_for(lambda: ready.exists() or worker.poll() is not None, 120, 0.1) and worker.poll() is None, worker_log.read_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the probes' view: open, no token
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING

        # kiln serve on the Kubernetes ConfigMap's kiln.toml, its DNS name pointed at this worker.
        raw = (ROOT / "deploy" / "kubernetes" / "base" / "kiln.toml").read_text()
        assert 'remote = ["dns:///kiln-worker:9000"]' in raw
        http_port = free_port()
        raw = (raw.replace('host = "0.0.0.0"', 'host = "127.0.0.1"').replace("port = 8000", f"port = {http_port}")
               .replace("dns:///kiln-worker:9000", f"dns:///localhost:{port}").replace("/var/lib/kiln/images", str(tmp_path / "images")))
        tomllib.loads(raw)
        config = tmp_path / "kiln.toml"
        config.write_text(raw)
        serve_log = tmp_path / "serve.log"
        with open(serve_log, "wb") as out:
            serve = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)], cwd=ROOT,
                                     env={**env, "KILN_WORKER_TOKEN": TOKEN, "KILN_API_KEYS": API_KEY}, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(url, 120, serve, serve_log)
        r = httpx.post(url + "/v1/images/generations", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120,
                       json={"model": "kiln-shapes", "prompt": "a red circle", "size": "64x64", "response_format": "b64_json"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["b64_json"]
        assert "torch" not in serve_log.read_text() + worker_log.read_text()
    finally:
        for proc in (serve, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
