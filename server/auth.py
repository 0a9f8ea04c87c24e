"""Bearer-token authentication as a gRPC server interceptor, refusing before the request is read.

Every call must carry ``authorization: Bearer <token>`` metadata, except the standard health service,
which Kubernetes gRPC probes call without credentials. Tokens are compared in constant time.

A refused call costs next to nothing whatever it carries: grpc.aio runs interceptors on the call's headers,
before any message is received, and the handler we answer with is a *client-streaming* one that never
reads. gRPC receives a message only when the handler asks for it (unary handlers ask before they start),
so the body is never buffered: the server takes in at most what HTTP/2 flow control lets the client send
before the status and the stream reset reach it (one stream window), then discards it.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
_MESSAGE = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


async def _refuse_unary(requests, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


async def _refuse_stream(requests, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)


# Built once: client-streaming handlers (so gRPC never reads the request) without deserializers.
_REFUSE_UNARY_RESPONSE = grpc.stream_unary_rpc_method_handler(_refuse_unary)
_REFUSE_STREAM_RESPONSE = grpc.stream_stream_rpc_method_handler(_refuse_stream)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the configured bearer token with UNAUTHENTICATED, without reading them.

    ``on_refused(method)`` is called with the method's short name ("ModelInfer") for each refusal.
    Raises ValueError for an empty token (it would accept anyone).
    """

    def __init__(self, token: str, on_refused: Callable[[str], None] = lambda method: None) -> None:
        if not token:
            raise ValueError("an empty auth token would accept anyone")
        self._expected = f"Bearer {token}".encode()
        self._on_refused = on_refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                if hmac.compare_digest(given, self._expected):
                    return handler
        self._on_refused(details.method.rsplit("/", 1)[-1])
        return _REFUSE_STREAM_RESPONSE if handler.response_streaming else _REFUSE_UNARY_RESPONSE
