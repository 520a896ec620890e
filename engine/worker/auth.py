"""Who may call a worker: the shared worker token, TLS server credentials, the loopback rule.

Every RPC of a worker started with a token must carry gRPC metadata
`authorization: Bearer <token>`; otherwise it is refused with UNAUTHENTICATED (WorkerAuthError in
engine/worker/status.py's table) before any handler runs. The token comes from the environment
(KILN_WORKER_TOKEN) or a file (`--token-file`), never from the command line: argv is visible to
every user of the machine in `ps`.

The standard health service (grpc.health.v1) is open: Kubernetes' `grpc:` probes cannot send
metadata, and it reveals nothing but SERVING / NOT_SERVING.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from engine.errors import WorkerAuthError
from engine.worker.status import to_status

log = logging.getLogger(__name__)

TOKEN_ENV = "KILN_WORKER_TOKEN"
METADATA_KEY = "authorization"  # lower case: gRPC metadata keys are
SCHEME = "Bearer "
MIN_TOKEN_CHARS = 16
# Callable without the token: the health check, which Kubernetes' grpc probes call without metadata.
# Not Watch, its stream: anyone reaching the port could otherwise hold streams open for free.
OPEN_METHODS = ("/grpc.health.v1.Health/Check",)
LOG_EVERY_S = 10.0  # at most one refusal line per this many seconds: a scanner must not flood the log


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a client sends with every call to a worker that has `token`."""
    return ((METADATA_KEY, SCHEME + token),) if token else ()


def token_problem(token: str) -> str | None:
    """Why `token` is not acceptable (never quoting it), or None."""
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        return f"must be at least {MIN_TOKEN_CHARS} characters without spaces"
    return None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name (or 0.0.0.0's spelling in another form): assume reachable


@dataclass(frozen=True)
class ServerTLS:
    """PEM bytes of the worker's certificate chain and key, and of the CA its clients' certificates
    must chain to (None: clients need no certificate)."""

    cert_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


def _constant_time_digest(value: str) -> bytes:
    # Hashing first makes the comparison's time independent of the supplied value's length too.
    return hashlib.sha256(value.encode()).digest()


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the right token, except the open health service."""

    def __init__(self, token: str):
        self._digest = _constant_time_digest(SCHEME + token)
        self._last_logged = float("-inf")
        self._unlogged = 0

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        supplied = next((value for key, value in details.invocation_metadata or () if key == METADATA_KEY), None)
        if isinstance(supplied, str) and hmac.compare_digest(_constant_time_digest(supplied), self._digest):
            return handler
        if supplied is None:
            why = (
                f"this worker requires a token: send gRPC metadata '{METADATA_KEY}: {SCHEME}<token>' "
                f"(the front end's workers.token or {TOKEN_ENV})"
            )
        else:
            why = (
                f"the worker token is wrong: set the front end's workers.token (or {TOKEN_ENV}) "
                "to the token this worker was started with"
            )
        self._log_refusal(details.method, "no token" if supplied is None else "a wrong token")
        return _refusal(handler, WorkerAuthError(why))

    def _log_refusal(self, method: str, what: str) -> None:
        now = time.monotonic()
        if now - self._last_logged < LOG_EVERY_S:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        log.warning("refused a call to %s with %s%s", method, what, more)  # the supplied value is never logged
        self._last_logged, self._unlogged = now, 0


def _refusal(handler: grpc.RpcMethodHandler, error: WorkerAuthError) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with `error`'s status at once; the
    request is never decoded (no deserializer), so an unauthenticated caller costs no parsing."""
    code, message, trailing = to_status(error)

    async def refuse(request, context) -> None:
        await context.abort(code, message, trailing_metadata=trailing)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def read_pem(path: str | Path, setting: str) -> bytes:
    """The bytes of a PEM file; a missing or unreadable file is an error naming `setting`."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"{setting} {path}: cannot read it ({e.strerror})") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{setting} {path}: not a PEM file (no -----BEGIN line)")
    return data
