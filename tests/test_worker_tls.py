"""TLS to workers: a worker with --tls-cert/--tls-key speaks only TLS; with --tls-client-ca it also
requires a client certificate that CA signed (mutual TLS). The CA is made in the test with the
`openssl` command. Real worker processes, real gRPC."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import pytest

from engine.client.credentials import tls_channel_credentials
from engine.client.pool import WorkerPool
from engine.request import ImageRequest
from engine.worker import inference_pb2 as pb
from tests._tls import make_ca
from tests._workers import V2, arun, start_workers

TOKEN = "tls-token-0123456789abcdef"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    made = make_ca(tmp_path_factory.mktemp("ca"))
    if made is None:
        pytest.skip("the TLS tests make a throwaway CA with the `openssl` command, which is not installed")
    return made


def tls_worker(package, ca, mutual: bool):
    args = ["--tls-cert", str(ca.server_cert), "--tls-key", str(ca.server_key)]
    if mutual:
        args += ["--tls-client-ca", str(ca.ca)]
    return start_workers(package, token=TOKEN, extra_args=args)


@pytest.fixture(scope="module")
def tls(tiny_package, ca):
    workers = tls_worker(tiny_package("sd1"), ca, mutual=False)
    yield workers.addresses[0]
    workers.stop()


@pytest.fixture(scope="module")
def mutual(tiny_package, ca):
    workers = tls_worker(tiny_package("sd1"), ca, mutual=True)
    yield workers.addresses[0]
    workers.stop()


def ready(address: str, credentials: grpc.ChannelCredentials | None) -> bool | grpc.RpcError:
    v2 = V2(address, token=TOKEN, credentials=credentials)
    try:
        return v2.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    except grpc.RpcError as e:
        return e
    finally:
        v2.close()


def test_a_tls_worker_serves_the_pool_through_its_ca(tls, ca):
    async def run():
        async with WorkerPool([tls], token=TOKEN, credentials=tls_channel_credentials(str(ca.ca))) as pool:
            request = ImageRequest(model="sd1", prompt="a cat", width=64, height=64, seed=1, steps=2)
            return await pool.ready(), await pool.generate(request, timeout=60)

    is_ready, result = asyncio.run(run())
    assert is_ready and len(result.images_png) == 1


def test_a_tls_worker_refuses_a_plaintext_client(tls):
    refused = ready(tls, credentials=None)
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE


def test_a_worker_found_by_dns_is_checked_against_the_name_not_the_address(tiny_package, ca):
    """Discovery dials pod addresses; the worker's certificate names the DNS name (as a cluster's
    certificates do), so the pool checks the certificate against the name it resolved."""
    from engine.client.discovery import DnsDiscovery
    from tests._tls import NAMED_HOST

    workers = start_workers(tiny_package("sd1"), token=TOKEN, extra_args=["--tls-cert", str(ca.named_cert), "--tls-key", str(ca.named_key)])
    credentials = tls_channel_credentials(str(ca.ca))

    async def names(name):
        assert name.host == NAMED_HOST
        return workers.addresses  # 127.0.0.1:port, which the certificate does not name

    async def run():
        discovery = DnsDiscovery([f"dns:///{NAMED_HOST}:50051"], token=TOKEN, credentials=credentials, resolver=names)
        async with WorkerPool([], discovery=discovery) as pool:
            try:
                return await pool.generate(ImageRequest(model="sd1", prompt="a dot", width=64, height=64, seed=0, steps=1), timeout=60)
            finally:
                await discovery.stop()

    try:
        result = arun(run())
    finally:
        workers.stop()
    assert result.worker == workers.addresses[0] and len(result.images_png) == 1


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual, ca):
    refused = ready(mutual, grpc.ssl_channel_credentials(root_certificates=ca.ca.read_bytes()))
    assert isinstance(refused, grpc.RpcError) and refused.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate_of_its_ca(mutual, ca):
    credentials = tls_channel_credentials(str(ca.ca), cert_file=str(ca.client_cert), key_file=str(ca.client_key))
    assert ready(mutual, credentials) is True


def test_a_missing_certificate_file_is_a_start_up_error_naming_the_flag(tiny_package, ca, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "worker", "--package", str(tiny_package("sd1")),
         "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(ca.server_key)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "--tls-cert" in done.stderr and "cannot read it" in done.stderr
