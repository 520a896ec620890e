"""Error responses as the OpenAPI schema documents them (the bodies come from server/errors.py)."""

from __future__ import annotations

from litestar.openapi import ResponseSpec

from server.protocol import ErrorResponse


def error_spec(description: str) -> ResponseSpec:
    return ResponseSpec(ErrorResponse, description=description, generate_examples=False)


ERROR_RESPONSES = {
    400: error_spec("Bad parameter (named in error.param), malformed JSON or wrong type"),
    401: error_spec("Missing or wrong API key"),
    404: error_spec("Unknown model"),
    413: error_spec("Request body over the limit"),
    429: error_spec("The workers' queues are full; see Retry-After"),
    503: error_spec("No worker ready; see Retry-After"),
    504: error_spec("The generation passed the server's deadline"),
}
