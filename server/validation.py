"""Strict request-body validation, before Litestar's own (which coerces "2" to 2).

A wrong type is a client bug the client should hear about (`"n": "2"` is a 400 naming `n`), so
each JSON route decodes its body with msgspec in strict mode first, as its `before_request` hook.
The route's `data` argument (what the OpenAPI schema is generated from) is then the same value.
"""

from __future__ import annotations

import re
from typing import Awaitable, Callable

import msgspec
from litestar import Request

from server.errors import InvalidBodyError, InvalidJSONError

_AT = re.compile(r"^(.*) - at `\$\.?(.*)`$")
_MISSING = re.compile(r"Object missing required field `([^`]+)`")


def strict_body(struct_type: type) -> Callable[[Request], Awaitable[None]]:
    decoder = msgspec.json.Decoder(struct_type)

    async def check(request: Request) -> None:
        body = await request.body()
        try:
            decoder.decode(body)
        except msgspec.ValidationError as e:
            message, param = explain(str(e))
            raise InvalidBodyError(message, param=param) from None
        except msgspec.DecodeError as e:
            what = "empty" if not body.strip() else f"not valid JSON ({e})"
            raise InvalidJSONError(f"the request body is {what}: send a JSON object") from None
        except RecursionError:  # msgspec's own limit on nesting, hit by a hostile body
            raise InvalidJSONError("the request body is nested too deeply: send a plain JSON object") from None

    return check


def explain(text: str) -> tuple[str, str | None]:
    """msgspec's 'Expected `int`, got `str` - at `$.n`' -> ("invalid type for 'n': expected int, got str", "n")."""
    m = _AT.match(text)
    what, where = (m.group(1), m.group(2)) if m else (text, "")
    missing = _MISSING.search(what)
    if missing:
        field = f"{where}.{missing.group(1)}" if where else missing.group(1)
        return f"missing required parameter: '{field}'", field
    what = what.replace("`", "")
    what = what[:1].lower() + what[1:]
    if not where:
        return f"the request body must be a JSON object: {what}", None
    return f"invalid value for '{where}': {what}", where
