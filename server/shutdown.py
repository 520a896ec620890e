"""Graceful shutdown of the front end: nothing admitted is lost, nothing is cut mid-answer.

On SIGTERM or SIGINT (`kiln serve`, see server/main.py):
  1. The socket stays open and every new request gets `503 service_unavailable` with
     `Retry-After` and `Connection: close` (an OpenAI error object, which clients retry), /ready
     included, so a load balancer takes the instance out. Keeping the listener open rather than
     closing it first means a client racing the shutdown gets an answer it knows to retry, not a
     connection refused that some clients report as a hard failure.
  2. Requests in flight (generations, streams, downloads) finish, for up to the drain time
     (`limits.drain_timeout_s`, by default the request timeout + 5 s, so that any request that
     could still succeed does).
  3. If the drain time passes, the generations still running are cancelled in their workers and
     answered `503` (a JSON error object; a started stream gets its error event and `[DONE]`).
  4. Then the server stops; local workers are stopped after it (they drain for longer still).
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec

from server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("kiln.server.shutdown")

OPEN_WHILE_DRAINING = ("/health", "/metrics")  # an operator still sees the process and its numbers
CLEANUP_S = 10.0  # after the drain time: how long cancelled requests get to send their answers


class Drain:
    def __init__(self, timeout_s: float, retry_after_s: int):
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        self.draining = False
        self.in_flight = 0
        self._changed: asyncio.Event | None = None  # made in the serving loop
        self._expired: asyncio.Event | None = None

    @property
    def expired(self) -> asyncio.Event:
        """Set when the drain time has passed: generations still running give up (with a 503)."""
        if self._expired is None:
            self._expired = asyncio.Event()
        return self._expired

    def _notify(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.set()

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        self._notify()

    async def refuse(self, send) -> None:
        """The 503 a new request gets while the server drains."""
        body = ErrorResponse(
            error=ErrorBody(
                message="the server is shutting down and takes no new requests; retry (another instance will answer)",
                type="server_error",
                code="service_unavailable",
            )
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"retry-after", str(self.retry_after_s).encode()),
            (b"x-should-retry", b"true"),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": msgspec.json.encode(body)})

    async def run(self) -> None:
        """Stop admitting, wait for the requests in flight (up to the drain time), end the rest."""
        self.draining = True
        start = time.monotonic()
        log.info("shutting down: no new requests; waiting for %d in flight (at most %g s)", self.in_flight, self.timeout_s)
        if not await self._until_idle(self.timeout_s):
            log.warning("drain time (%g s) passed with %d requests in flight: ending them with 503", self.timeout_s, self.in_flight)
            self.expired.set()
            if not await self._until_idle(CLEANUP_S):
                log.error("%d requests still in flight %.0f s after the drain time", self.in_flight, CLEANUP_S)
        log.info("drained in %.1f s", time.monotonic() - start)

    async def _until_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        if self._changed is None:
            self._changed = asyncio.Event()
        while True:
            self._changed.clear()  # before the check: a leave() after it sets the event again
            if self.in_flight <= 0:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return True
