"""Bearer-token authentication as a gRPC server interceptor.

Every call must carry ``authorization: Bearer <token>`` metadata, except the
standard health service, which Kubernetes gRPC probes call without
credentials. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _reject(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def abort_unary(request, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')",
        )

    async def abort_stream(requests, context):
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')",
        )
        yield  # pragma: no cover - makes this an async generator

    kinds = {
        (False, False): (grpc.unary_unary_rpc_method_handler, abort_unary),
        (False, True): (grpc.unary_stream_rpc_method_handler, abort_stream),
        (True, False): (grpc.stream_unary_rpc_method_handler, abort_unary),
        (True, True): (grpc.stream_stream_rpc_method_handler, abort_stream),
    }
    factory, behaviour = kinds[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without the configured bearer token with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty auth token would accept anyone")
        self._expected = f"Bearer {token}".encode()

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
        return _reject(handler)
