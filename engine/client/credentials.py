"""How the client pool reaches one worker: its address, the worker token, TLS or plaintext.

    remote = tls_channel_credentials("ca.pem", cert_file="front.pem", key_file="front.key")
    pool = WorkerPool([Endpoint("10.0.0.7:50051", token=token, credentials=remote),
                       Endpoint("127.0.0.1:40001", token=local_token)])  # loopback: plaintext

The token travels as gRPC metadata on every call (engine.worker.auth.call_metadata), not as
channel call credentials: gRPC refuses those on a plaintext channel, and local workers listen on
loopback plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc

from engine.worker.auth import call_metadata, read_pem


@dataclass(frozen=True)
class Endpoint:
    address: str  # host:port
    token: str | None = field(default=None, repr=False)  # a secret: kept out of repr and logs
    credentials: grpc.ChannelCredentials | None = None  # None: plaintext
    # With TLS: the name the worker's certificate must carry, when it is not the host dialled
    # (workers found by DNS are dialled by pod address; their certificate names the DNS name).
    tls_server_name: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return call_metadata(self.token)


def tls_channel_credentials(
    ca_file: str, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to workers whose certificates `ca_file` signed, presenting `cert_file`/`key_file` when the
    workers require a client certificate. Raises ValueError naming the workers.tls_* setting at fault."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("workers.tls_cert_file and workers.tls_key_file come as a pair")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, "workers.tls_ca_file"),
        private_key=read_pem(key_file, "workers.tls_key_file") if key_file else None,
        certificate_chain=read_pem(cert_file, "workers.tls_cert_file") if cert_file else None,
    )
