"""Outermost ASGI layer: a request id on every request, one structured access log line, HTTP metrics,
and the request head's size limit (server/http_limits.py).

It wraps the whole Litestar app so that it also sees requests that never reach a route (404, 405).
A client-sent `x-request-id` of up to 64 safe characters is kept; otherwise one is made. The id is
returned in the `x-request-id` response header and named in 500 bodies and the logs.
"""

from __future__ import annotations

import logging
import re
import secrets
import time

from server.errors import REQUEST_ID_KEY, error_parts
from server.http_limits import head_bytes, head_too_large, largest_header
from server.metrics import Metrics
from server.shutdown import OPEN_WHILE_DRAINING, Drain

log = logging.getLogger("kiln.server.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")


class Observed:
    def __init__(self, app, metrics: Metrics, drain: Drain, max_header_bytes: int | None = None):
        self.app, self.metrics, self.drain = app, metrics, drain
        self.max_header_bytes = max_header_bytes  # None: not checked here

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self._observed(scope, receive, send)

    async def _observed(self, scope, receive, send) -> None:
        incoming = next((v for k, v in scope.get("headers", ()) if k == b"x-request-id"), b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else "req_" + secrets.token_hex(12)
        scope[REQUEST_ID_KEY] = request_id
        status = 500  # if the app dies before answering, uvicorn sends a 500
        start = time.perf_counter()

        async def send_with_id(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        refused = self.drain.draining and scope.get("path") not in OPEN_WHILE_DRAINING
        try:
            size = head_bytes(scope) if self.max_header_bytes is not None else 0
            if refused:  # answered here, with an id and a log line like any other, never admitted
                await self.drain.refuse(send_with_id)
            elif self.max_header_bytes is not None and size > self.max_header_bytes:
                await _answer(send_with_id, head_too_large(size, self.max_header_bytes, _largest(scope)), request_id)
            else:
                self.drain.enter()
                try:
                    await self.app(scope, receive, send_with_id)
                finally:
                    self.drain.leave()
        finally:
            elapsed = time.perf_counter() - start
            # Requests refused while draining never reach the router: no route template to name.
            route = "draining" if refused else scope.get("path_template") or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.inc(route=route, method=method, status=str(status))
            self.metrics.latency.observe(elapsed, route=route)
            log.info(
                "request_id=%s method=%s path=%s route=%s status=%d duration_ms=%.1f client=%s",
                request_id,
                method,
                _redacted(scope.get("path", "")),
                route,
                status,
                elapsed * 1000,
                (scope.get("client") or ("-",))[0],
            )


def _redacted(path: str) -> str:
    """Hosted image ids are capabilities: keep them out of the logs. Control and non-ASCII
    characters are escaped (a %0a in a URL must not write a forged line into the log)."""
    if path.startswith("/v1/images/files/"):
        return "/v1/images/files/<id>"
    return path.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def _largest(scope) -> tuple[str, int] | None:
    return largest_header([(k, len(k) + len(v) + 4) for k, v in scope.get("headers", ())])


async def _answer(send, exc: BaseException, request_id: str) -> None:
    """An error answered here, before the app (which never sees the request)."""
    status, headers, body = error_parts(exc, request_id, retry_after_s=0)
    raw = [(b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
