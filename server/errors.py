"""Core errors of the server, free of gRPC: the servicer maps each to a status
(the table in README, Errors).

Messages are written for the caller: they say what was wrong and what to send instead. They never carry
the repository's absolute path (``ModelManager`` names files relative to the repository) and never echo
client-supplied text unbounded (``echo``); a message is capped at ``MAX_MESSAGE_CHARS`` as a last guard,
since gRPC carries it in a trailer that clients refuse beyond 8 KiB.
"""

from __future__ import annotations

#: The longest message a client receives (characters; gRPC's default trailer limit is 8 KiB).
MAX_MESSAGE_CHARS = 1000
#: The most characters of a client-supplied value (a model name, a version) echoed back.
MAX_ECHO_CHARS = 64


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` quoted for a message (ASCII-escaped like ``ascii()``), cut to ``limit`` characters
    with a note of its full length when longer."""
    text = str(value)
    if len(text) <= limit:
        return ascii(text)
    return f"{ascii(text[:limit])}... ({len(text)} characters)"


class ServingError(Exception):
    """Base class; ``status`` names the gRPC status code the servicer returns."""

    status = "INTERNAL"

    def __init__(self, message: str = "", *args: object) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 20] + " ... (message cut)"
        super().__init__(message, *args)


class ModelNotFoundError(ServingError):
    status = "NOT_FOUND"


class ModelUnavailableError(ServingError):
    """The model (or the whole server) exists but cannot take work right now."""

    status = "UNAVAILABLE"


class InvalidRequestError(ServingError):
    """The request is malformed, or its data was rejected by the model's runtime (INVALID_ARGUMENT)."""

    status = "INVALID_ARGUMENT"


class QueueFullError(ServingError):
    """Admission refused; ``retry_after_ms`` becomes ``grpc-retry-pushback-ms``."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceededError(ServingError):
    status = "DEADLINE_EXCEEDED"


class ExecutionTimeoutError(DeadlineExceededError):
    """A batch ran past its model's ``execution_timeout_s``; the replica that ran it is replaced."""


class BackendError(ServingError):
    """The model raised, crashed or returned outputs that break its signature while running.

    The message names the model (and, for a broken output, the tensor and what was expected); a traceback
    goes to the log, never to the caller."""

    status = "INTERNAL"


class ModelLoadError(ServingError):
    """A model could not be loaded; it shows as UNAVAILABLE with this reason."""

    status = "FAILED_PRECONDITION"
