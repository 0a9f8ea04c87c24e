"""Core errors of the server, free of gRPC: the servicer maps each to a status
(the table in README, Errors).

Messages are written for the caller: they say what was wrong and what to send instead.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class; ``status`` names the gRPC status code the servicer returns."""

    status = "INTERNAL"


class ModelNotFoundError(ServingError):
    status = "NOT_FOUND"


class ModelUnavailableError(ServingError):
    """The model (or the whole server) exists but cannot take work right now."""

    status = "UNAVAILABLE"


class InvalidRequestError(ServingError):
    status = "INVALID_ARGUMENT"


class QueueFullError(ServingError):
    """Admission refused; ``retry_after_ms`` becomes ``grpc-retry-pushback-ms``."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceededError(ServingError):
    status = "DEADLINE_EXCEEDED"


class BackendError(ServingError):
    """The model raised while running; the traceback goes to the log, not the caller."""

    status = "INTERNAL"


class ModelLoadError(ServingError):
    """A model could not be loaded; it shows as UNAVAILABLE with this reason."""

    status = "FAILED_PRECONDITION"
