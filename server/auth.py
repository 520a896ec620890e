"""Bearer API keys on every API route, compared in constant time; some paths stay open.

Open: the paths in `server.open_paths` (health, readiness, metrics and the OpenAPI schema by
default; an entry also opens the paths below it) and the hosted image files, whose unguessable ids
are their own credential. Keys are never logged or echoed in an error.
"""

from __future__ import annotations

import hmac
import logging

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from server.errors import AuthenticationError

log = logging.getLogger("kiln.server.auth")

OPEN_OPT = "open"  # route handler opt: served without a key


class ApiKeyGuard:
    def __init__(self, keys: list[str], open_paths: list[str]):
        self._keys = [k.encode() for k in keys]
        self._open = tuple(p.rstrip("/") or "/" for p in open_paths)
        if not self._keys:
            log.warning("no API keys configured: the API is open to anyone who can reach it")

    def is_open(self, path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in self._open)

    def check(self, authorization: str | None) -> None:
        if not self._keys:
            return
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in the header 'Authorization: Bearer YOUR_API_KEY'."
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("The Authorization header must be 'Bearer YOUR_API_KEY'.")
        given = token.strip().encode()
        ok = False
        for key in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise AuthenticationError("Incorrect API key provided.")

    def __call__(self, connection: ASGIConnection, route_handler: BaseRouteHandler) -> None:
        if route_handler.opt.get(OPEN_OPT) or self.is_open(connection.scope["path"]):
            return
        self.check(connection.headers.get("authorization"))
