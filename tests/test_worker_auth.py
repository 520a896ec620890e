"""The worker token: every RPC but health needs it (UNAUTHENTICATED otherwise, unary and
streaming), the client pool treats a refused token as a configuration error (never a dead
worker), the token is never logged nor put on a command line, and a worker reachable from other
machines refuses to start without one. Real worker processes, real gRPC."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from engine.client.pool import WorkerPool
from engine.errors import WorkerAuthError
from engine.request import ImageRequest
from engine.worker import inference_pb2 as pb
from engine.worker.auth import call_metadata
from tests._workers import V2, infer_request, start_workers

TOKEN = "right-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@pytest.fixture(scope="module")
def guarded(tiny_package, tmp_path_factory):
    """One worker started with TOKEN, logging to a file."""
    log_dir = tmp_path_factory.mktemp("guarded-logs")
    workers = start_workers(tiny_package("sd1"), log_dir=log_dir, token=TOKEN)
    workers.log = log_dir / "worker-0.log"
    yield workers
    workers.stop()


def call(address: str, method, token: str | None):
    """Call `method` (a descriptor of the service) with an empty request; the reply, or the error."""
    with grpc.insecure_channel(address) as channel:
        path = f"/{SERVICE.full_name}/{method.name}"
        request = getattr(pb, method.input_type.name)()
        response = getattr(pb, method.output_type.name)
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        stub = kind(path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response.FromString)
        try:
            reply = stub(request, timeout=10, metadata=call_metadata(token))
            return list(reply) if method.server_streaming else reply
        except grpc.RpcError as e:
            return e


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_every_rpc_without_a_token_is_unauthenticated(guarded, method):
    error = call(guarded.addresses[0], method, token=None)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "requires a token" in error.details() and "KILN_WORKER_TOKEN" in error.details()


@pytest.mark.parametrize("method", list(SERVICE.methods), ids=lambda m: m.name)
def test_every_rpc_with_a_wrong_token_is_unauthenticated(guarded, method):
    error = call(guarded.addresses[0], method, token=WRONG)
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "worker token is wrong" in error.details()
    assert ("kiln-error", "WorkerAuthError") in error.trailing_metadata()


def test_the_right_token_is_served_unary_and_streaming(guarded):
    v2 = V2(guarded.addresses[0], token=TOKEN)
    try:
        assert v2.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        request = infer_request(prompt="a cat", width=64, height=64, seed=1, steps=2)
        assert v2.ModelInfer(request, timeout=60).outputs
        events = [m.infer_response.parameters["kiln_event"].string_param for m in v2.ModelInferStream(request, timeout=60)]
        assert events[-1] == "result" and "progress" in events
    finally:
        v2.close()


def test_refusals_are_logged_without_any_token(guarded):
    assert isinstance(call(guarded.addresses[0], SERVICE.methods_by_name["ServerReady"], token=WRONG), grpc.RpcError)
    text = guarded.log.read_text()
    assert "refused a call" in text
    assert TOKEN not in text and WRONG not in text


def test_a_local_workers_token_is_in_its_environment_never_on_its_command_line(guarded):
    pid = guarded.processes[0].pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not any(TOKEN.encode() in arg for arg in argv)
    assert b"KILN_WORKER_TOKEN=" + TOKEN.encode() in environ


def generate(pool: WorkerPool):
    return pool.generate(ImageRequest(model="sd1", prompt="a cat", width=64, height=64, seed=1, steps=2), timeout=60)


def test_the_pool_with_the_right_token_generates(guarded):
    async def run():
        async with WorkerPool(guarded.addresses, token=TOKEN) as pool:
            return await pool.ready(), await generate(pool)

    ready, result = asyncio.run(run())
    assert ready and len(result.images_png) == 1


def test_a_wrong_token_is_a_configuration_error_logged_once_and_the_worker_stays_up(guarded, caplog):
    (address,) = guarded.addresses

    async def run():
        async with WorkerPool([address], token=WRONG) as pool:
            errors = []
            for _ in range(3):
                with pytest.raises(WorkerAuthError) as refused:
                    await generate(pool)
                errors.append(refused.value)
            return errors, await pool.ready(), pool.status()

    errors, ready, status = asyncio.run(run())
    assert all(address in str(e) and "worker token" in str(e) for e in errors)
    assert not ready
    assert status[0].up and status[0].failures == 0, "a refused token is not a dead worker"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "refused the worker token" in r.getMessage()]
    assert len(logged) == 1 and address in logged[0].getMessage()
    assert all(TOKEN not in r.getMessage() and WRONG not in r.getMessage() for r in caplog.records)


def worker_command(package: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "kiln.cli", "worker", "--package", str(package), "--threads", "1", *options]


def env_without_token(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KILN_WORKER_TOKEN"}
    return {**env, **extra}


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "example.internal:50051"])
def test_a_worker_reachable_from_other_machines_refuses_to_start_without_a_token(tiny_package, listen):
    done = subprocess.run(worker_command(tiny_package("sd1"), "--listen", listen), env=env_without_token(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "KILN_WORKER_TOKEN" in done.stderr and f"--listen {listen}" in done.stderr


def test_a_short_token_is_refused_without_echoing_it(tiny_package):
    done = subprocess.run(worker_command(tiny_package("sd1"), "--listen", "127.0.0.1:0"),
                          env=env_without_token(KILN_WORKER_TOKEN="short-secret"), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert "KILN_WORKER_TOKEN" in done.stderr and "at least 16 characters" in done.stderr
    assert "short-secret" not in done.stderr + done.stdout


def test_a_token_file_and_the_environment_together_are_refused(tiny_package, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    done = subprocess.run(worker_command(tiny_package("sd1"), "--token-file", str(token_file)),
                          env=env_without_token(KILN_WORKER_TOKEN=WRONG), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 2 and "--token-file or KILN_WORKER_TOKEN, not both" in done.stderr
