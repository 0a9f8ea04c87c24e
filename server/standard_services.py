"""gRPC's standard health and reflection services, registered so that their requests are parsed like ours.

grpcio's generated registration deserializes before the handler runs, so a message that is not protobuf is
answered UNKNOWN with a traceback in the log per call; the health service takes calls without a token,
so anyone could fill the log. Here the handlers get bytes and parse them: a malformed message is
INVALID_ARGUMENT, counted and logged at most once per interval (``refuse_malformed``), and the servicers
from grpcio-health-checking and grpcio-reflection do the rest unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

#: ``refuse_malformed(method, message_class, context, error)``: answer INVALID_ARGUMENT (raises AbortError).
Refuse = Callable[[str, type[Message], grpc.aio.ServicerContext, Exception], Awaitable[None]]


def health_handler(servicer: health.aio.HealthServicer, refuse_malformed: Refuse) -> grpc.GenericRpcHandler:
    """``grpc.health.v1.Health`` (Check, Watch) over ``servicer``, parsing requests itself."""

    async def parse(raw: bytes, method: str, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckRequest:
        try:
            return health_pb2.HealthCheckRequest.FromString(raw)
        except DecodeError as err:
            await refuse_malformed(method, health_pb2.HealthCheckRequest, context, err)
            raise  # not reached: refuse_malformed aborts the call

    async def check(raw: bytes, context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        return await servicer.Check(await parse(raw, "Check", context), context)

    async def watch(raw: bytes, context: grpc.aio.ServicerContext) -> None:
        await servicer.Watch(await parse(raw, "Watch", context), context)

    serialize = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        health.SERVICE_NAME,
        {
            "Check": grpc.unary_unary_rpc_method_handler(check, response_serializer=serialize),
            "Watch": grpc.unary_stream_rpc_method_handler(watch, response_serializer=serialize),
        },
    )


def reflection_handler(service_names: list[str], pool, refuse_malformed: Refuse) -> grpc.GenericRpcHandler:
    """``grpc.reflection.v1alpha.ServerReflection`` for ``service_names`` from the descriptor ``pool``."""
    servicer = reflection.aio.ReflectionServicer(service_names, pool=pool)

    async def info(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        async def parsed() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            async for raw in raw_requests:
                try:
                    yield reflection_pb2.ServerReflectionRequest.FromString(raw)
                except DecodeError as err:
                    await refuse_malformed("ServerReflectionInfo", reflection_pb2.ServerReflectionRequest, context, err)

        async for response in servicer.ServerReflectionInfo(parsed(), context):
            yield response

    return grpc.method_handlers_generic_handler(
        reflection.SERVICE_NAME,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                info, response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString
            )
        },
    )
