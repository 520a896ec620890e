"""Every failure the engine reports, as a specific exception type.

The gRPC worker and the HTTP front end map these types to status codes in one table each, so a
new error belongs here, with a message that names the argument or file that is wrong.
"""


class KilnError(Exception):
    """Base class of every error Kiln raises on purpose."""


class InvalidRequestError(KilnError, ValueError):
    """A generation parameter is out of range; `param` names it."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownSamplerError(InvalidRequestError):
    """The sampler name is not one the engine implements."""


class UnknownLoraError(InvalidRequestError):
    """A request names a LoRA its model does not have (param "loras")."""


class PackageError(KilnError):
    """A model package is missing, corrupt, or cannot run here."""


class IncompatiblePackageError(PackageError):
    """The package was made by an incompatible tool version or for a provider not installed."""


class CheckpointError(KilnError):
    """The source checkpoint folder is missing, corrupt or of an unsupported layout."""


class NonFiniteOutputError(KilnError):
    """The model produced NaN or inf; the image is withheld instead of returned black."""


class QueueFullError(KilnError):
    """The worker's bounded queue is full; retry later."""


class WorkerUnavailableError(KilnError):
    """No worker can take the request now (draining, not ready, or down)."""


class WorkerAuthError(WorkerUnavailableError):
    """A worker refused the caller's worker token (missing or wrong): a configuration error.

    A kind of WorkerUnavailableError so that the front end answers 503 (no worker can serve this
    front end), but the client pool never treats it as a worker that died: retrying would fail
    the same way, and the message must name the setting to fix."""


class ModelNotFoundError(InvalidRequestError):
    """No loaded package has the requested model name (param "model")."""


class DeadlineExceededError(KilnError, TimeoutError):
    """The request's deadline passed before its images were made; the work was dropped."""


class RequestCancelledError(KilnError):
    """The request was cancelled before it finished."""


class EngineError(KilnError):
    """The engine failed while running a model (an onnxruntime error, say); see the message."""
