"""Every failure the front end reports, mapped to HTTP status and OpenAI error type in ONE table.

Every 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}` (`code` a string or null).
Deterministic failures (the same request would fail again) carry `x-should-retry: false`, so the
openai client does not repeat GPU work; 429 and 503 carry `Retry-After`. A 500 body never holds a
stack trace: the trace goes to the log under the request id, which the body names.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import msgspec
from litestar import Request, Response
from litestar.exceptions import (
    ClientException,
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import RequestEntityTooLarge

from engine.errors import ModelNotFoundError as WorkerModelNotFoundError
from engine.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    KilnError,
    NonFiniteOutputError,
    PackageError,
    QueueFullError,
    RequestCancelledError,
    UnknownLoraError,
    WorkerAuthError,
    WorkerUnavailableError,
)
from server.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("kiln.server")


class ApiError(KilnError):
    """Raised by the serving modules; `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BadRequestError(ApiError, InvalidRequestError):
    """A request field has a valid type but a value this server does not accept."""


class InvalidBodyError(ApiError):
    """The JSON body has a wrong type or misses a required field."""


class InvalidJSONError(ApiError):
    """The body is not JSON at all."""


class ModelNotFoundError(ApiError):
    """The requested model is neither a local name nor an alias."""


class ImageNotFoundError(ApiError):
    """The hosted image never existed or has expired."""


class HeadTooLargeError(ApiError):
    """The request line and headers are longer than server.max_header_bytes (server/http_limits.py)."""


class InvalidHTTPError(ApiError):
    """The request is not HTTP/1.1 the parser can read (refused before any route)."""


class AuthenticationError(ApiError):
    """Missing or wrong API key."""


class ClientDisconnectedError(ApiError):
    """The client went away before the answer was ready; its generation was cancelled."""


@dataclass(frozen=True)
class ErrorSpec:
    status: int
    type: str
    code: str | None
    retry: bool | None = None  # x-should-retry: False for deterministic failures; None: not sent
    retry_after: bool = False


# THE table. Looked up along the exception's MRO, so the most specific entry wins.
ERROR_TABLE: dict[type[BaseException], ErrorSpec] = {
    # request problems: the same request fails again
    BadRequestError: ErrorSpec(400, "invalid_request_error", "invalid_value", retry=False),
    InvalidBodyError: ErrorSpec(400, "invalid_request_error", "invalid_type", retry=False),
    InvalidJSONError: ErrorSpec(400, "invalid_request_error", "invalid_json", retry=False),
    InvalidRequestError: ErrorSpec(400, "invalid_request_error", "invalid_value", retry=False),
    UnknownLoraError: ErrorSpec(400, "invalid_request_error", "lora_not_found", retry=False),
    ValidationException: ErrorSpec(400, "invalid_request_error", "invalid_type", retry=False),
    ClientException: ErrorSpec(400, "invalid_request_error", "invalid_request", retry=False),
    InvalidHTTPError: ErrorSpec(400, "invalid_request_error", "invalid_request", retry=False),
    HeadTooLargeError: ErrorSpec(431, "invalid_request_error", "request_header_too_large", retry=False),
    AuthenticationError: ErrorSpec(401, "invalid_request_error", "invalid_api_key", retry=False),
    NotAuthorizedException: ErrorSpec(401, "invalid_request_error", "invalid_api_key", retry=False),
    ModelNotFoundError: ErrorSpec(404, "invalid_request_error", "model_not_found", retry=False),
    WorkerModelNotFoundError: ErrorSpec(404, "invalid_request_error", "model_not_found", retry=False),
    ImageNotFoundError: ErrorSpec(404, "invalid_request_error", "image_not_found", retry=False),
    NotFoundException: ErrorSpec(404, "invalid_request_error", "not_found", retry=False),
    MethodNotAllowedException: ErrorSpec(405, "invalid_request_error", "method_not_allowed", retry=False),
    RequestEntityTooLarge: ErrorSpec(413, "invalid_request_error", "request_too_large", retry=False),
    # nobody reads it; 499 (nginx's "client closed request") keeps it apart in logs and metrics
    ClientDisconnectedError: ErrorSpec(499, "invalid_request_error", "client_closed_request", retry=False),
    RequestCancelledError: ErrorSpec(499, "invalid_request_error", "client_closed_request", retry=False),
    # capacity: worth retrying after a pause
    QueueFullError: ErrorSpec(429, "rate_limit_error", "queue_full", retry=True, retry_after=True),
    # A worker refusing our token is a configuration error: retrying cannot help, so no Retry-After.
    WorkerAuthError: ErrorSpec(503, "server_error", "worker_auth_failed", retry=False),
    WorkerUnavailableError: ErrorSpec(503, "server_error", "service_unavailable", retry=True, retry_after=True),
    # the server's deadline: the same work would take as long again, so no automatic retry
    DeadlineExceededError: ErrorSpec(504, "server_error", "timeout", retry=False),
    TimeoutError: ErrorSpec(504, "server_error", "timeout", retry=False),
    # engine failures: deterministic given the seed
    NonFiniteOutputError: ErrorSpec(500, "server_error", "non_finite_output", retry=False),
    PackageError: ErrorSpec(500, "server_error", "model_package_error", retry=False),
    KilnError: ErrorSpec(500, "server_error", "engine_error", retry=False),
    # a bug
    Exception: ErrorSpec(500, "server_error", None, retry=False),
}


def spec_for(exc: BaseException) -> ErrorSpec:
    for cls in type(exc).__mro__:
        spec = ERROR_TABLE.get(cls)
        if spec is None:
            continue
        if isinstance(exc, HTTPException) and spec.status != exc.status_code:
            break  # a Litestar error the table does not name (429 from a plugin, say): keep its status
        return spec
    if isinstance(exc, HTTPException):
        status = exc.status_code
        return ErrorSpec(status, "invalid_request_error" if status < 500 else "server_error", None, retry=status >= 500)
    return ERROR_TABLE[Exception]


def describe(exc: BaseException, request_id: str, request_line: str = "") -> tuple[ErrorBody, ErrorSpec]:
    """The OpenAI error body and its spec for `exc`."""
    spec = spec_for(exc)
    param = getattr(exc, "param", None)
    if isinstance(exc, ValidationException):
        message, param = _validation_message(exc)
    elif isinstance(exc, RequestEntityTooLarge):
        message = "the request body is larger than this server accepts (server.max_body_bytes)"
    elif isinstance(exc, NotFoundException):
        message = f"invalid URL ({request_line}): the API lives under /v1; see /schema for its OpenAPI description"
    elif isinstance(exc, MethodNotAllowedException):
        allowed = (exc.headers or {}).get("allow", "")
        message = "this method is not allowed on this route" + (f"; allowed: {allowed}" if allowed else "")
    elif isinstance(exc, ClientException):
        message = _client_message(exc)
    elif isinstance(exc, TimeoutError):
        message = str(exc) or "the generation did not finish before the server's deadline (limits.request_timeout_s)"
    elif spec.status == 500 and spec.code is None:
        message = f"the server had an internal error while processing the request (request id {request_id})"
    else:
        message = str(exc) or type(exc).__name__
    return ErrorBody(message=message, type=spec.type, param=param, code=spec.code), spec


def error_parts(exc: BaseException, request_id: str, retry_after_s: int, request_line: str = "") -> tuple[int, dict[str, str], bytes]:
    """(status, headers, JSON body) of the answer to `exc`, for any layer that answers errors."""
    body, spec = describe(exc, request_id, request_line)
    if spec.status >= 500 and spec.code is None:
        log.error("unhandled error (request id %s)", request_id, exc_info=exc)
    elif spec.status >= 500:
        log.warning("%s (request id %s): %s", type(exc).__name__, request_id, exc)
    headers = {}
    if spec.retry is not None:
        headers["x-should-retry"] = "true" if spec.retry else "false"
    if spec.retry_after:
        headers["retry-after"] = str(retry_after_s)
    if isinstance(exc, MethodNotAllowedException) and exc.headers:
        headers.update(exc.headers)
    return spec.status, headers, msgspec.json.encode(ErrorResponse(error=body))


def error_response(exc: BaseException, request_id: str, retry_after_s: int, request_line: str = "") -> Response:
    status, headers, content = error_parts(exc, request_id, retry_after_s, request_line)
    return Response(content, status_code=status, media_type="application/json", headers=headers)


def error_event(exc: BaseException, request_id: str) -> bytes:
    """The SSE event that ends a stream which fails after its 200 was sent."""
    body, _ = describe(exc, request_id)
    return b"data: " + msgspec.json.encode(ErrorResponse(error=body)) + b"\n\n"


def make_exception_handler(retry_after_s: int):
    def handle(request: Request, exc: Exception) -> Response:
        line = f"{request.scope.get('method', '')} {request.scope.get('path', '')}"
        return error_response(exc, request_id_of(request.scope), retry_after_s, line)

    return handle


REQUEST_ID_KEY = "kiln.request_id"  # ASGI scope key set by server/observe.py


def request_id_of(scope) -> str:
    return scope.get(REQUEST_ID_KEY, "-")


_MISSING_FIELD = re.compile(r"Object missing required field `([^`]+)`")


def _validation_message(exc: ValidationException) -> tuple[str, str | None]:
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra and isinstance(exc.extra[0], dict) else {}
    key, text = extra.get("key"), str(extra.get("message", exc.detail))
    if key == "data":  # the body as a whole
        missing = _MISSING_FIELD.search(text)
        if missing:
            return f"missing required parameter: '{missing.group(1)}'", missing.group(1)
        if text.startswith("Expected"):
            return f"the request body must be a JSON object: {text}", None
        return "the request body is missing or empty: send a JSON object", None
    if key:
        return f"invalid value for '{key}': {text}", key
    return str(exc.detail), None


def _client_message(exc: ClientException) -> str:
    detail = str(exc.detail)
    if "JSON" in detail or "truncated" in detail or "malformed" in detail.lower() or "decode" in detail.lower():
        return f"the request body is not valid JSON: {detail}"
    return detail
