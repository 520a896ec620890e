"""Across hosts: `kiln serve` finds its workers by one DNS name, and follows it while under load.

Four network namespaces on this machine (tests/_netns.py): a front-end host, two worker hosts and,
later, a third. In the front end's host, `kiln-worker` resolves (its /etc/hosts) to the worker
hosts; workers.remote is ["dns:///kiln-worker:50051"]. Every worker listens on its host's address
with a worker token, and the front end carries it.

Under a steady load of Images API requests from this process:
- one worker host dies (kill -9, then its link is pulled) and leaves the name: every request is
  answered 200 (those in flight there are retried once on the other worker, as documented), and
  the host leaves the front end's pool;
- a third host joins the name: it serves requests within the re-resolution interval.
A client without the worker token is refused by the workers.

Skips, saying why, where network namespaces cannot be made (not root, no `ip`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from engine.client.discovery import DEFAULT_INTERVAL_S
from engine.worker import inference_pb2 as pb
from tests._netns import Network, NetnsUnavailable
from tests._server import API_KEY, MODEL, ROOT, wait_ready
from tests._workers import V2, metrics, wait_for

TOKEN = "multihost-worker-token-0123456789"
PORT = 50051
SLACK_S = 10.0  # on top of the re-resolution interval: a new worker's first request on 2 busy cores


@pytest.fixture
def net():
    try:
        with Network() as network:
            yield network
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces unavailable: {e}")


def start_worker(net: Network, host: str, package: Path, logs: Path) -> subprocess.Popen:
    address = f"{net.hosts[host]}:{PORT}"
    ready = logs / f"{host}.ready"
    cmd = [sys.executable, "-m", "kiln.cli", "worker", "--package", str(package), "--listen", address,
           "--ready-file", str(ready), "--threads", "1", "--max-batch", "2", "--warmup-size", "64x64"]
    env = {**os.environ, "KILN_WORKER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(logs / f"{host}.log", "wb") as out:
        proc = net.popen(host, cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if not wait_for(lambda: ready.exists() or proc.poll() is not None, 120, 0.1) or proc.poll() is not None:
        raise AssertionError(f"worker on {host} did not start:\n{(logs / f'{host}.log').read_text()[-3000:]}")
    return proc


def front_end_config(address: str, package: Path, images: Path) -> str:
    return f"""
[server]
host = "{address}"
port = 8000

[[models]]
name = "{MODEL}"
package = "{package}"
default_size = "64x64"
default_steps = 2
max_side = 128

[workers]
local = 0
remote = ["dns:///kiln-worker:{PORT}"]
models_refresh_s = 2

[images]
dir = "{images}"

[limits]
max_n = 1
request_timeout_s = 90
"""


class Load:
    """`clients` threads posting small Images API requests until stopped; every status kept."""

    def __init__(self, url: str, clients: int = 3):
        self.url = url
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def _client(self, k: int) -> None:
        seed = k * 100_000
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
            while not self._stop.is_set():
                seed += 1
                try:
                    r = c.post("/v1/images/generations", json={"model": MODEL, "prompt": "a green square", "size": "64x64",
                                                               "seed": seed, "response_format": "b64_json"})
                    self.statuses.append(r.status_code)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:300]}")
                except httpx.HTTPError as e:
                    self.failures.append(f"{type(e).__name__}: {e}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(150)


def completed(address: str) -> float:
    try:
        return metrics(address, TOKEN).get("requests_completed", 0.0)
    except grpc.RpcError:
        return -1.0


def pool_members(url: str) -> set[str]:
    """The workers the front end's /metrics reports (its pool, scraped now)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {line.split('worker="', 1)[1].split('"', 1)[0] for line in text.splitlines() if line.startswith("kiln_worker_") and 'worker="' in line}


def test_workers_found_by_one_dns_name_come_and_go_under_load(net, tiny_package, tmp_path):
    package = tiny_package("sd1")
    front = net.add_host("fe", 10)
    w1, w2 = net.add_host("w1", 11), net.add_host("w2", 12)
    a1, a2 = f"{w1}:{PORT}", f"{w2}:{PORT}"
    workers = {"w1": start_worker(net, "w1", package, tmp_path), "w2": start_worker(net, "w2", package, tmp_path)}
    net.hosts_file("fe", {"kiln-worker": [w1, w2]})

    config = tmp_path / "kiln.toml"
    config.write_text(front_end_config(front, package, tmp_path / "images"))
    log = tmp_path / "front.log"
    env = {**os.environ, "KILN_API_KEYS": API_KEY, "KILN_WORKER_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        fe = net.popen("fe", [sys.executable, "-m", "kiln.cli", "serve", "--config", str(config)], cwd=ROOT, env=env,
                       stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{front}:8000"
    wait_ready(url, 120, fe, log)

    with Load(url) as load:
        # Both hosts behind the name serve.
        assert wait_for(lambda: completed(a1) >= 3 and completed(a2) >= 3, 90, 0.2), f"both workers serve: {load.failures}"

        # A worker host dies, then leaves the name.
        workers["w2"].send_signal(signal.SIGKILL)
        workers["w2"].wait()
        net.unplug("w2")
        net.hosts_file("fe", {"kiln-worker": [w1]})
        before = completed(a1)
        assert wait_for(lambda: pool_members(url) == {a1}, DEFAULT_INTERVAL_S + SLACK_S, 0.2), pool_members(url)
        assert wait_for(lambda: completed(a1) >= before + 3, 60, 0.2), "the surviving worker keeps serving"

        # A third host joins the name.
        w3 = net.add_host("w3", 13)
        a3 = f"{w3}:{PORT}"
        workers["w3"] = start_worker(net, "w3", package, tmp_path)
        net.hosts_file("fe", {"kiln-worker": [w1, w3]})
        joined = time.monotonic()
        assert wait_for(lambda: completed(a3) >= 1, DEFAULT_INTERVAL_S + SLACK_S, 0.1), f"{a3} got no request"
        took = time.monotonic() - joined
        assert pool_members(url) == {a1, a3}

    front_log = log.read_text(errors="replace")
    assert load.failures == [], f"client-visible errors: {load.failures[:5]}\n{front_log[-3000:]}"
    assert len(load.statuses) >= 20 and set(load.statuses) == {200}
    assert took <= DEFAULT_INTERVAL_S + SLACK_S
    print(f"\n{len(load.statuses)} requests, all 200; the third worker served {took:.1f} s after joining the name; "
          f"retries after the kill: {front_log.count('retrying on another worker')}")

    # The worker token: every worker refuses a client without it, or with another.
    for address in (a1, a3):
        for token in (None, "not-the-worker-token-0123456789"):
            v2 = V2(address, token)
            try:
                with pytest.raises(grpc.RpcError) as refused:
                    v2.ServerReady(pb.ServerReadyRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            finally:
                v2.close()
        v2 = V2(address, TOKEN)
        try:
            assert v2.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        finally:
            v2.close()

    fe.send_signal(signal.SIGTERM)
    assert fe.wait(60) == 0
