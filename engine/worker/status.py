"""The one table from engine errors to gRPC status codes, and back.

The worker aborts a call with `to_status(error)`; the client turns the status back into the same
exception type with `from_status(...)`. Kiln's worker always sends trailing metadata naming the
error type (`kiln-error`) and, for bad parameters, the parameter (`kiln-param`): a status without
it came from the transport (a worker that died, a deadline the client set), not from a worker.

| error                        | gRPC status         | when                                            |
|------------------------------|---------------------|-------------------------------------------------|
| ModelNotFoundError           | NOT_FOUND           | no loaded package has that model name           |
| InvalidRequestError (+param) | INVALID_ARGUMENT    | a bad parameter; the message names it           |
| QueueFullError               | RESOURCE_EXHAUSTED  | the admission queue is full (nothing was done)  |
| WorkerAuthError              | UNAUTHENTICATED     | no worker token, or a wrong one (see auth.py)   |
| WorkerUnavailableError       | UNAVAILABLE         | loading, warming up, draining or shut down      |
| DeadlineExceededError        | DEADLINE_EXCEEDED   | the call's deadline passed; its work was dropped|
| RequestCancelledError        | CANCELLED           | the request was cancelled                       |
| NonFiniteOutputError         | INTERNAL            | the model produced NaN/inf                      |
| EngineError, anything else   | INTERNAL            | onnxruntime or another engine failure           |
"""

from __future__ import annotations

import grpc

from engine import errors as E

ERROR_KEY = "kiln-error"
PARAM_KEY = "kiln-param"

# Most specific first: the first matching type decides.
STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (E.ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (E.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (E.QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.WorkerAuthError, grpc.StatusCode.UNAUTHENTICATED),  # before its base class
    (E.WorkerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (E.DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.RequestCancelledError, grpc.StatusCode.CANCELLED),
    (E.NonFiniteOutputError, grpc.StatusCode.INTERNAL),
    (E.EngineError, grpc.StatusCode.INTERNAL),
)

# Error types the client re-raises by name; anything else comes back as EngineError.
KNOWN: dict[str, type[E.KilnError]] = {
    cls.__name__: cls
    for cls in (
        E.ModelNotFoundError,
        E.UnknownSamplerError,
        E.UnknownLoraError,
        E.InvalidRequestError,
        E.QueueFullError,
        E.WorkerAuthError,
        E.WorkerUnavailableError,
        E.DeadlineExceededError,
        E.RequestCancelledError,
        E.NonFiniteOutputError,
        E.EngineError,
    )
}

# A status without Kiln metadata, by code, on the client side.
TRANSPORT: dict[grpc.StatusCode, type[E.KilnError]] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: E.DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: E.ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: E.InvalidRequestError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: E.EngineError,  # a message over the size limit
    grpc.StatusCode.UNIMPLEMENTED: E.EngineError,  # a worker of another version
    grpc.StatusCode.UNAUTHENTICATED: E.WorkerAuthError,  # a proxy in front of the worker refused us
}


def status_code(error: BaseException) -> grpc.StatusCode:
    for cls, code in STATUS:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(error: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) for aborting a call with `error`."""
    message = str(error) or type(error).__name__
    metadata = [(ERROR_KEY, type(error).__name__ if isinstance(error, E.KilnError) else "EngineError")]
    param = getattr(error, "param", None)
    if param:
        metadata.append((PARAM_KEY, param))
        message = f"invalid {param}: {message}"
    if not isinstance(error, E.KilnError):
        message = f"engine error ({type(error).__name__}): {message}"
    return status_code(error), message, tuple(metadata)


def from_status(code: grpc.StatusCode, details: str, trailing: dict[str, str]) -> E.KilnError | None:
    """The exception a worker's status stands for; None when the status came from the transport
    (the worker died or could not be reached) and the call may be retried elsewhere."""
    name = trailing.get(ERROR_KEY)
    details = details or ""
    if name is None:
        cls = TRANSPORT.get(code)
        return cls(f"{code.name}: {details}") if cls else None
    cls = KNOWN.get(name, E.EngineError)
    if issubclass(cls, E.InvalidRequestError):
        param = trailing.get(PARAM_KEY)
        prefix = f"invalid {param}: "
        return cls(details[len(prefix):] if param and details.startswith(prefix) else details, param=param)
    return cls(details)
