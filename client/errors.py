"""One exception hierarchy for everything a call can fail with.

Every failure an application sees from :mod:`tensorwire.client` is an
:class:`InferenceServerError` (client-side input problems included, as
:class:`InvalidInputError`), so ``except InferenceServerError`` is enough to
catch them all, and the subclasses name the conditions worth handling
separately. The mapping follows the server's status codes (README, Errors); the
message always keeps the server's own explanation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

#: Trailing-metadata key with which a server asks the client to wait before retrying.
PUSHBACK_KEY = "grpc-retry-pushback-ms"


class InferenceServerError(Exception):
    """A call failed; ``code`` is the gRPC status (``None`` for in-band stream errors
    without one), ``details`` the server's explanation, unchanged."""

    #: The status code a subclass stands for (``None`` on the base class).
    status: grpc.StatusCode | None = None

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
        debug_error_string: str | None = None,
    ) -> None:
        self.code: grpc.StatusCode | None = code if code is not None else self.status
        self.details: str = details
        self.trailing_metadata = trailing_metadata
        self.debug_error_string = debug_error_string
        super().__init__(f"{self.code.name}: {details}" if self.code is not None else details)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling of exceptions.
        return (_rebuild, (type(self), self.details, self.code, self.trailing_metadata))


def _rebuild(
    cls: type[InferenceServerError], details: str, code: grpc.StatusCode | None, trailing: tuple
) -> InferenceServerError:
    return cls(details, code, trailing_metadata=trailing)


class ModelNotFoundError(InferenceServerError):
    """NOT_FOUND: the model (or the requested version) is not in the server's repository."""

    status = grpc.StatusCode.NOT_FOUND


class InvalidInputError(InferenceServerError, ValueError):
    """INVALID_ARGUMENT: wrong input name, datatype, shape or contents.

    Raised too, before anything is sent, when the client cannot encode an input.
    """

    status = grpc.StatusCode.INVALID_ARGUMENT


class ServerBusyError(InferenceServerError):
    """RESOURCE_EXHAUSTED: the model's queue is full (or a message is over the size limit).

    ``retry_after`` is the server's ``grpc-retry-pushback-ms`` hint in seconds, if it sent one.
    """

    status = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asked the client to wait before trying again; None without a valid hint."""
        return pushback_s(self.trailing_metadata)


class DeadlineExceededError(InferenceServerError, TimeoutError):
    """DEADLINE_EXCEEDED: the call's deadline (or the server's queue timeout) passed."""

    status = grpc.StatusCode.DEADLINE_EXCEEDED


class UnavailableError(InferenceServerError, ConnectionError):
    """UNAVAILABLE: no connection to any server, or the server/model is loading or draining."""

    status = grpc.StatusCode.UNAVAILABLE


class UnauthenticatedError(InferenceServerError):
    """UNAUTHENTICATED: the server requires a bearer token and got none or a wrong one."""

    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(InferenceServerError):
    """PERMISSION_DENIED: the credentials are valid but not allowed to do this."""

    status = grpc.StatusCode.PERMISSION_DENIED


class RequestCancelledError(InferenceServerError):
    """CANCELLED: the call was cancelled (by this client, or the server on shutdown)."""

    status = grpc.StatusCode.CANCELLED


class UnsupportedError(InferenceServerError):
    """UNIMPLEMENTED: the server does not offer this RPC (an optional protocol extension)."""

    status = grpc.StatusCode.UNIMPLEMENTED


class InternalServerError(InferenceServerError):
    """INTERNAL / UNKNOWN / DATA_LOSS: the model or the server failed; details say which model."""

    status = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[InferenceServerError]] = {
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNIMPLEMENTED: UnsupportedError,
    grpc.StatusCode.INTERNAL: InternalServerError,
    grpc.StatusCode.UNKNOWN: InternalServerError,
    grpc.StatusCode.DATA_LOSS: InternalServerError,
}

_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def error_class(code: grpc.StatusCode | None) -> type[InferenceServerError]:
    """The exception class for a status code (the base class for codes without their own)."""
    if code is None:
        return InferenceServerError
    return _BY_CODE.get(code, InferenceServerError)


def make_error(
    code: grpc.StatusCode | None,
    details: str,
    trailing_metadata: Iterable[tuple[str, str | bytes]] = (),
    debug_error_string: str | None = None,
) -> InferenceServerError:
    """Build the right exception for a status code, keeping the server's details."""
    return error_class(code)(
        details,
        code,
        trailing_metadata=tuple((str(k), v) for k, v in trailing_metadata),
        debug_error_string=debug_error_string,
    )


def _metadata(value: Any) -> tuple[tuple[str, str | bytes], ...]:
    if not value:
        return ()
    return tuple((item[0], item[1]) for item in value)


def from_rpc_error(error: grpc.RpcError) -> InferenceServerError:
    """Translate a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` into our hierarchy.

    The subclass follows the status code (:func:`error_class`); details, trailing metadata
    (pushback included) and gRPC's debug string are kept.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else None
    if code is grpc.StatusCode.CANCELLED:
        # A locally cancelled blocking stream never receives a status from the server:
        # asking for its trailing metadata or debug string would wait forever.
        return make_error(code, details or "cancelled")
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    debug = error.debug_error_string() if hasattr(error, "debug_error_string") else None
    details = details or (code.name.lower() if code else str(error))
    return make_error(code, details, _metadata(trailing), debug)


def from_stream_message(message: str) -> InferenceServerError:
    """An in-band ``ModelStreamInferResponse.error_message`` as an exception.

    The stream carries only text. When it starts with a status name (``"NOT_FOUND: ..."``,
    as tensorwire writes it) the matching subclass is raised; otherwise the base class
    with ``code=None``.
    """
    head, sep, rest = message.partition(":")
    code = _BY_NAME.get(head.strip()) if sep else None
    if code is not None and code is not grpc.StatusCode.OK:
        return make_error(code, rest.strip())
    return InferenceServerError(message)


def pushback_s(trailing_metadata: Iterable[tuple[str, str | bytes]]) -> float | None:
    """The ``grpc-retry-pushback-ms`` hint in seconds; ``None`` if absent, malformed or negative.

    gRPC's retry design (A6) treats a malformed or negative pushback as "do not retry".
    """
    for key, value in trailing_metadata:
        if key == PUSHBACK_KEY:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            try:
                pushback_ms = int(text.strip())
            except ValueError:
                return None
            return pushback_ms / 1000.0 if pushback_ms >= 0 else None
    return None


def has_pushback_key(trailing_metadata: Iterable[tuple[str, str | bytes]]) -> bool:
    """Whether the server sent a pushback entry at all (valid or not)."""
    return any(key == PUSHBACK_KEY for key, _ in trailing_metadata)
