"""The standard service name, its methods and a reflection view under that name.

Our messages live in package ``tensorwire.v2`` (see inference.proto for why),
but the service is served and called as ``inference.GRPCInferenceService``,
the path every v2 client, gateway and load generator uses. This module is the
one place that maps between the two; server and client both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message

from tensorwire.proto import inference_pb2 as pb

#: The protocol's fully qualified service name, as on the wire.
SERVICE_NAME = "inference.GRPCInferenceService"
_OUR_PACKAGE = pb.DESCRIPTOR.package  # "tensorwire.v2"
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


@dataclass(frozen=True)
class Method:
    """One RPC of the service, with the message classes that (de)serialize it."""

    name: str
    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def _message_class(full_name: str) -> type[Message]:
    return getattr(pb, full_name.rsplit(".", 1)[-1])


#: Every method of the service, keyed by its short name ("ModelInfer", ...).
METHODS: dict[str, Method] = {
    m.name: Method(
        name=m.name,
        path=f"/{SERVICE_NAME}/{m.name}",
        request=_message_class(m.input_type.full_name),
        response=_message_class(m.output_type.full_name),
        client_streaming=m.client_streaming,
        server_streaming=m.server_streaming,
    )
    for m in _SERVICE.methods
}


def _rename_types(message: descriptor_pb2.DescriptorProto, old: str, new: str) -> None:
    for field in message.field:
        if field.type_name.startswith(old):
            field.type_name = new + field.type_name[len(old) :]
    for nested in message.nested_type:
        _rename_types(nested, old, new)


@cache
def standard_descriptor_pool() -> descriptor_pool.DescriptorPool:
    """A private pool holding our file re-packaged as ``inference``.

    Server reflection serves from it, so ``grpcurl describe`` and ``list``
    show ``inference.GRPCInferenceService`` with its standard message names,
    without touching protobuf's default pool (where tritonclient may have
    registered the same names).
    """
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    old, new = f".{_OUR_PACKAGE}.", ".inference."
    proto.name = "inference/grpc_service.proto"
    proto.package = "inference"
    for message in proto.message_type:
        _rename_types(message, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool
