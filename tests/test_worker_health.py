"""Health: the standard grpc.health.v1 service (SERVING once ready, NOT_SERVING while draining,
open without the worker token), and the front end's health endpoints never change routing: a
failed probe from /ready or /metrics marks no worker down. Real worker processes, real gRPC,
synchronised on the workers' own answers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from typing import Callable

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.client.pool import WorkerPool
from engine.request import ImageRequest
from engine.worker import inference_pb2 as pb
from tests._server import API_KEY, MODEL, free_port
from tests._workers import V2, infer_request, start_workers, wait_for

TOKEN = "health-token-0123456789abcdef"
SERVICES = ("", "inference.GRPCInferenceService")
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def health(address: str, service: str = "") -> int:
    """grpc.health.v1 Check, as a Kubernetes `grpc:` probe sends it: no metadata, no token."""
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


class Draining:
    """A worker (with the token) that got SIGTERM while one long request was running: not ready,
    draining, until the request finishes."""

    def __init__(self, package):
        self.workers = start_workers(package, token=TOKEN, restart=False)
        self.address = self.workers.addresses[0]
        self.v2 = V2(self.address, token=TOKEN)
        request = infer_request(prompt="a cat", width=192, height=192, seed=3, steps=150)
        self.stream = self.v2.ModelInferStream(request, timeout=120)
        next(self.stream)  # running
        self.workers.processes[0].send_signal(signal.SIGTERM)
        assert wait_for(lambda: not self.v2.ServerReady(pb.ServerReadyRequest(), timeout=5).ready, 30), "not draining"

    def finish(self) -> str:
        """The last event of the long request (it finishes while the worker drains)."""
        return list(self.stream)[-1].infer_response.parameters["kiln_event"].string_param

    def close(self) -> None:
        self.v2.close()
        self.workers.stop()


@pytest.fixture
def draining(tiny_package):
    worker = Draining(tiny_package("sd1"))
    yield worker
    worker.close()


def test_health_is_serving_once_ready_and_needs_no_token(tiny_package):
    workers = start_workers(tiny_package("sd1"), token=TOKEN)
    try:
        assert [health(workers.addresses[0], s) for s in SERVICES] == [SERVING, SERVING]
        # Watch is a stream: open only with the token, or anyone could hold streams open for free.
        with grpc.insecure_channel(workers.addresses[0]) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10)
            with pytest.raises(grpc.RpcError) as refused:
                next(watch)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
            assert next(watch).status == SERVING
            watch.cancel()
    finally:
        workers.stop()


def test_health_is_not_serving_while_draining_and_accepted_work_still_finishes(draining):
    assert [health(draining.address, s) for s in SERVICES] == [NOT_SERVING, NOT_SERVING]
    assert draining.finish() == "result"


class HoldingProxy:
    """A TCP proxy in front of a worker whose client-to-worker direction can be held: while held,
    a call's bytes wait in the proxy, so its deadline passes for certain (a short deadline alone
    can race a fast loopback answer), and the connection itself stays healthy."""

    def __init__(self, upstream: str):
        self.host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.address = ""
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> "HoldingProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection(self.host, self.upstream_port)
        self._writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, gate: asyncio.Event | None) -> None:
            while data := await src.read(65536):
                if gate is not None:
                    await gate.wait()
                dst.write(data)
                await dst.drain()
            dst.close()
            await dst.wait_closed()

        await asyncio.gather(pipe(reader, up_writer, self.flowing), pipe(up_reader, writer, None), return_exceptions=True)


def test_a_failed_ready_probe_marks_no_worker_down(tiny_package):
    """ready() whose probe times out: False, yet the worker stays in routing and serves next."""
    workers = start_workers(tiny_package("sd1"))
    try:

        async def run():
            async with HoldingProxy(workers.addresses[0]) as proxy, WorkerPool([proxy.address], probe_timeout=0.3) as pool:
                await pool.models()  # connected
                proxy.flowing.clear()
                ready = await pool.ready()  # its request waits in the proxy: deadline exceeded
                status = pool.status()
                proxy.flowing.set()
                request = ImageRequest(model="sd1", prompt="a", width=64, height=64, seed=1, steps=2)
                return ready, status, await pool.generate(request, timeout=60), proxy.address

        ready, status, result, address = asyncio.run(run())
    finally:
        workers.stop()
    assert not ready
    assert status[0].up and status[0].failures == 0
    assert result.worker == address


def in_process_front_end(pool: WorkerPool, package, worker: str, images) -> tuple[str, Callable[[], None]]:
    """The real app (uvicorn in a thread) over `pool`; its URL and a stop function."""
    import uvicorn

    from server.app import create_app
    from server.config import parse_config

    port = free_port()
    config = parse_config(
        {
            "server": {"port": port},
            "auth": {"api_keys": [API_KEY]},
            "models": [{"name": MODEL, "package": str(package), "default_size": "64x64", "default_steps": 2}],
            "workers": {"local": 0, "remote": [worker]},
            "images": {"dir": str(images)},
        },
        env={},
    )
    server = uvicorn.Server(uvicorn.Config(create_app(config, pool, close_engine=True), host="127.0.0.1", port=port,
                                           log_config=None, access_log=False))  # fmt: skip
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive(), 30) and server.started

    def stop() -> None:
        server.should_exit = True
        thread.join(15)

    return f"http://127.0.0.1:{port}", stop


def test_scraping_ready_and_metrics_never_marks_a_worker_down(draining, tiny_package, tmp_path):
    pool = WorkerPool([draining.address], token=TOKEN)
    url, stop = in_process_front_end(pool, tiny_package("sd1"), draining.address, tmp_path)
    try:
        for _ in range(3):
            assert httpx.get(url + "/ready", timeout=10).status_code == 503  # the worker is draining
            metrics = httpx.get(url + "/metrics", timeout=10)
            assert metrics.status_code == 200 and "kiln_workers_ready 0" in metrics.text
        (status,) = pool.status()
        assert status.up and status.failures == 0
    finally:
        stop()
    assert draining.finish() == "result"


def test_health_is_not_serving_before_the_worker_is_ready(tiny_package, tmp_path):
    """Live and loading: NOT_SERVING until the warm-up is done (long warm-up sizes to watch it)."""
    port, ready_file = free_port(), tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "worker", "--package", str(tiny_package("sd1")), "--threads", "1",
         "--listen", f"127.0.0.1:{port}", "--max-batch", "2", "--warmup-size", "256x256,384x384,448x448,512x512",
         "--ready-file", str(ready_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen: list[int] = []
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)

    def watch() -> bool:
        """Records each answer until the worker is ready (or gone)."""
        try:
            seen.append(stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status)
        except grpc.RpcError:
            pass  # not listening yet
        return ready_file.exists() or proc.poll() is not None

    try:
        assert wait_for(watch, 60) and ready_file.exists(), "not ready in 60 s"
        assert NOT_SERVING in seen and SERVING not in seen[: seen.index(NOT_SERVING)]
        assert health(f"127.0.0.1:{port}") == SERVING
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
