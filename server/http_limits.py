"""The request head's size limit (`server.max_header_bytes`): 431 as an OpenAI error object.

Two places enforce it, because a head can reach the server in two ways:
  * still arriving: uvicorn's h11 parser buffers at most `h11_max_incomplete_event_size` bytes of
    an incomplete head. `uvicorn_options` sets that to the configured limit and swaps in
    `KilnH11Protocol`, whose answer to a parse failure is an OpenAI error object (431 for a head
    over the limit, 400 for anything else h11 refuses) instead of uvicorn's plain-text 400.
  * complete: a head that arrives in one read is parsed whatever its size, so the ASGI layer
    (server/observe.py) measures every head with `head_bytes` and answers `head_too_large`.

After a refused head the client is usually still sending the rest of it. Closing at once would
drop those unread bytes and make the kernel reset the connection, and many clients then report
the reset, not the answer. So the protocol answers, shuts its sending side, and keeps reading and
discarding (a "lingering close", as Apache and nginx do) until the client closes or
`LINGER_S` passes.
"""

from __future__ import annotations

import logging
import re
import secrets
from typing import Any

import h11
import msgspec
from h11._connection import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from server.errors import HeadTooLargeError, InvalidHTTPError, describe
from server.protocol import ErrorResponse

log = logging.getLogger("kiln.server.access")

LINGER_S = 2.0  # at most this long reading and discarding what follows a refused head
_FIELD_NAME = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")


def uvicorn_options(max_header_bytes: int) -> dict[str, Any]:
    """The `uvicorn.Config(...)` keyword arguments that enforce `server.max_header_bytes` with
    OpenAI error objects (see the module docstring)."""
    return {"http": KilnH11Protocol, "h11_max_incomplete_event_size": max_header_bytes}


def head_bytes(scope) -> int:
    """The size of the request head as sent (request line, headers, CRLFs) from an ASGI scope."""
    target = len(scope.get("raw_path") or b"") + (len(scope["query_string"]) + 1 if scope.get("query_string") else 0)
    line = len(scope.get("method", "")) + 1 + target + len(" HTTP/1.1\r\n")
    return line + sum(len(k) + 2 + len(v) + 2 for k, v in scope.get("headers", ())) + 2


def largest_header(lines: list[tuple[bytes, int]]) -> tuple[str, int] | None:
    """(name, bytes) of the largest of (name, line size) pairs, None when there are none."""
    if not lines:
        return None
    name, size = max(lines, key=lambda pair: pair[1])
    return name.decode("latin-1").lower(), size


def head_too_large(size: int | None, limit: int, largest: tuple[str, int] | None) -> HeadTooLargeError:
    """The 431 error; `largest` names the biggest header (never its value: it may be a key)."""
    measured = f"is {size:,} bytes" if size is not None else "passed the limit before it ended"
    culprit = f"; the largest header is {largest[0]!r} ({largest[1]:,} bytes)" if largest else ""
    return HeadTooLargeError(
        f"the request head (request line and headers) {measured}; this server accepts at most {limit:,} "
        f"(server.max_header_bytes){culprit}",
        param=largest[0] if largest else None,
    )


def _partial_head_headers(buffer: bytes) -> list[tuple[bytes, int]]:
    """(name, line size) of the header lines in a partial head (the last, cut-off line included)."""
    lines = buffer.split(b"\r\n")[1:]
    found = []
    for line in lines:
        name = line.split(b":", 1)[0]
        if _FIELD_NAME.match(name):
            found.append((name, len(line) + 2))
    return found


class KilnH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with OpenAI error objects for heads it cannot parse, and a
    lingering close after them."""

    _lingering = False
    _linger_timer = None

    def send_400_response(self, msg: str) -> None:
        limit = self.config.h11_max_incomplete_event_size or DEFAULT_MAX_INCOMPLETE_EVENT_SIZE
        buffered, _ = self.conn.trailing_data
        if len(buffered) > limit:
            exc = head_too_large(None, limit, largest_header(_partial_head_headers(buffered)))
        else:
            exc = InvalidHTTPError(f"the request is not valid HTTP/1.1 ({msg.rstrip('.')}); check the request line and headers")
        request_id = "req_" + secrets.token_hex(12)
        body, spec = describe(exc, request_id)
        payload = msgspec.json.encode(ErrorResponse(error=body))
        log.info("request_id=%s status=%d refused before routing: %s", request_id, spec.status, body.message)
        headers = [
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
            (b"x-should-retry", b"false"),
        ]
        try:
            self.transport.write(self.conn.send(h11.Response(status_code=spec.status, headers=headers, reason=STATUS_PHRASES[spec.status])))
            self.transport.write(self.conn.send(h11.Data(data=payload)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:  # a response was already under way: nothing more can be said
            self.transport.close()
            return
        self._linger()

    def _linger(self) -> None:
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the rest of a refused request: read so the connection is not reset, dropped
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        if self._lingering:
            self.connections.discard(self)
            self._unset_keepalive_if_required()
            return
        super().connection_lost(exc)

    def shutdown(self) -> None:
        if self._lingering:
            self.transport.close()
            return
        super().shutdown()
