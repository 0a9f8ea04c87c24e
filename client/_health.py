"""The standard gRPC health service (``grpc.health.v1.Health/Check``) with protobuf alone.

Servers keep this service open when they require a token for everything else
(Kubernetes probes call it without credentials), so ``tensorwire health`` can
still tell live from ready there. The two messages are declared here, in a
private descriptor pool, instead of importing ``grpcio-health-checking``: the
client depends on grpcio, protobuf and numpy only, and a private pool never
clashes with the server's copy of the same messages in one process.

Message layout (``grpc/health/v1/health.proto``): ``HealthCheckRequest {string service = 1;}``,
``HealthCheckResponse {ServingStatus status = 1;}`` with UNKNOWN = 0, SERVING = 1,
NOT_SERVING = 2, SERVICE_UNKNOWN = 3.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_PATH = "/grpc.health.v1.Health/Check"

STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _message_classes() -> tuple[Any, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="tensorwire/client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = file.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = file.message_type.add(name="HealthCheckResponse")
    status = response.enum_type.add(name="ServingStatus")
    for number, name in STATUS_NAMES.items():
        status.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")),
    )


HealthCheckRequest, HealthCheckResponse = _message_classes()


def health_check(
    channel: grpc.Channel,
    service: str = "",
    *,
    timeout: float | None = None,
    metadata: tuple[tuple[str, str], ...] | None = None,
) -> str:
    """The serving status of ``service`` (``""``: the whole server) as its name, e.g. ``"SERVING"``.

    Raises ``grpc.RpcError`` as gRPC does: NOT_FOUND for a service the server does not know
    (tensorwire registers the server, ``inference.GRPCInferenceService`` and each model by name),
    UNAVAILABLE when no server answers, UNIMPLEMENTED when the server has no health service.
    """
    stub = channel.unary_unary(
        CHECK_PATH,
        request_serializer=HealthCheckRequest.SerializeToString,
        response_deserializer=HealthCheckResponse.FromString,
    )
    response = stub(HealthCheckRequest(service=service), timeout=timeout, metadata=metadata)
    return STATUS_NAMES.get(response.status, str(response.status))
