"""The gRPC front-end: protobuf in, data-plane calls, protobuf out; core errors become gRPC status codes.

Handlers are registered under the standard ``inference.GRPCInferenceService`` name (see
tensorwire.proto.service). Every request rule (deadlines, priorities, validation, budget, statistics,
stream ordering) lives in the data plane (:mod:`tensorwire.server.dataplane`), which the HTTP front-end
shares; this module only converts messages and maps errors.

Every handler receives the raw request bytes and parses them itself, so a message that is not protobuf is
answered INVALID_ARGUMENT with at most a rate-limited log line (gRPC's own deserializer would answer
UNKNOWN and log a traceback per message). ModelInfer is registered as a client-streaming handler: gRPC
reads a message only when asked, so a call that arrives while the in-flight memory budget is spent is
refused before its body is taken in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import CodecError, decode_contents, decode_raw
from tensorwire.proto.service import METHODS
from tensorwire.server.dataplane import (
    UNSET,
    DataPlane,
    InferRequest,
    InputTensor,
    MalformedMessage,
    StreamEnd,
    internal_error,
)
from tensorwire.server.engine import ServedVersion
from tensorwire.server.errors import InvalidRequestError, QueueFullError, ServingError
from tensorwire.server.lograte import RateLimitedLog
from tensorwire.server.replicas import EncodedTensor

log = logging.getLogger("tensorwire.servicer")


def status_of(err: ServingError) -> grpc.StatusCode:
    """The gRPC status of a core error (each names its own)."""
    return getattr(grpc.StatusCode, err.status)


# ------------------------------------------------------------- conversions


def _parameters(parameters) -> dict[str, Any]:
    """An InferParameter map as Python values; a parameter without a value set becomes ``UNSET``."""
    values = {}
    for name, parameter in parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[name] = UNSET if choice is None else getattr(parameter, choice)
    return values


def _both_forms(data: Any, datatype: str, shape: tuple[int, ...]) -> Any:
    raise CodecError("has both contents and raw_input_contents; send one")


def to_request(request: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as the data plane's neutral request (no validation here: the data plane checks
    every input before decoding it). Raw contents decode zero-copy; typed contents are decoded by the codec."""
    raw = request.raw_input_contents
    inputs = []
    wire_error = None
    if raw and len(raw) != len(request.inputs):
        wire_error = InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one per input, in order"
        )
    else:
        for index, tensor in enumerate(request.inputs):
            if raw:
                data, decode = raw[index], decode_raw
                if tensor.HasField("contents"):
                    data, decode = None, _both_forms
            else:
                data, decode = tensor.contents, decode_contents
            parameters = _parameters(tensor.parameters) if tensor.parameters else None
            inputs.append(InputTensor(tensor.name, tensor.datatype, tuple(tensor.shape), data, decode, parameters))
    return InferRequest(
        request.model_name,
        request.model_version,
        request.id,
        inputs,
        [t.name for t in request.outputs] if request.outputs else None,
        _parameters(request.parameters) if request.parameters else None,
        wire_error,
    )


def build_response(version: ServedVersion, request_id: str, outputs: list[EncodedTensor]) -> pb.ModelInferResponse:
    """The ModelInferResponse carrying ``outputs`` (already encoded raw bytes, one per requested output)."""
    tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=version.name,
        model_version=str(version.version),
        id=request_id,
        outputs=[tensor(name=name, datatype=datatype, shape=shape) for name, datatype, shape, _ in outputs],
        raw_output_contents=[raw for _, _, _, raw in outputs],
    )


def _serialized_response(version: ServedVersion, request_id: str, outputs: list[EncodedTensor]) -> bytes:
    return build_response(version, request_id, outputs).SerializeToString()


class _Stream:
    """ModelStreamInfer's side of a data-plane stream: messages in, serialized answers out."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self.context = context

    async def read(self) -> tuple[InferRequest, int] | None:
        raw = await self.context.read()
        if raw is grpc.aio.EOF:
            return None
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            raise MalformedMessage from None
        return to_request(request), len(raw)

    def time_remaining(self) -> float | None:
        return self.context.time_remaining()

    def encode_answer(self, version: ServedVersion, request_id: str, outputs: list[EncodedTensor]) -> bytes:
        response = build_response(version, request_id, outputs)
        return pb.ModelStreamInferResponse(infer_response=response).SerializeToString()

    def encode_error(self, model_name: str, model_version: str, request_id: str, err: ServingError) -> bytes:
        return pb.ModelStreamInferResponse(
            error_message=f"{err.status}: {err}",
            infer_response=pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id),
        ).SerializeToString()

    async def write(self, answer: bytes) -> None:
        await self.context.write(answer)


class Servicer:
    """Implements every RPC of the service on top of a DataPlane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self._limited_log = RateLimitedLog(log)

    # ----------------------------------------------------------- helpers

    async def _abort(self, context: grpc.aio.ServicerContext, err: ServingError) -> None:
        if isinstance(err, QueueFullError):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_after_ms)),))
        await context.abort(status_of(err), str(err))

    async def refuse_malformed(
        self, method: str, message: type[Message], context: grpc.aio.ServicerContext, err: Exception
    ) -> None:
        """Refuse a message that does not parse: INVALID_ARGUMENT, counted under ``method``, at most a log
        line per interval. Raises grpc.aio.AbortError (the call is over)."""
        self.dataplane.refuse(method, "malformed")
        self._limited_log.warning("malformed_message", "method=%s peer=%s error=%r", method, context.peer(), str(err))
        name = message.DESCRIPTOR.full_name
        if name.startswith(f"{pb.DESCRIPTOR.package}."):  # ours travel under the standard package name
            name = f"inference.{message.DESCRIPTOR.name}"
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {name} protobuf message; send the serialized message {method} expects",
        )

    # -------------------------------------------------------------- health

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            return pb.ModelReadyResponse(ready=self.dataplane.model_ready(request.name, request.version))
        except ServingError as err:
            await self._abort(context, err)

    # ------------------------------------------------------------ metadata

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        name, version, extensions = self.dataplane.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        try:
            meta = self.dataplane.model_metadata(request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=meta.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        try:
            return pb.ModelConfigResponse(config=self.dataplane.model_config(request.name, request.version))
        except ServingError as err:
            await self._abort(context, err)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        try:
            stats = await self.dataplane.statistics(request.name, request.version)
            return pb.ModelStatisticsResponse(model_stats=stats)
        except ServingError as err:
            await self._abort(context, err)

    # ---------------------------------------------------------- repository

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=row.name, version=row.version, state=row.state, reason=row.reason)
                for row in await self.dataplane.repository_index(ready_only=request.ready)
            ]
        )

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context):
        try:
            await self.dataplane.load(request.model_name, dict(request.parameters))
        except ServingError as err:
            await self._abort(context, err)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context):
        try:
            await self.dataplane.unload(request.model_name)
        except ServingError as err:
            await self._abort(context, err)
        return pb.RepositoryModelUnloadResponse()

    # ----------------------------------------------------------- inference

    async def ModelInfer(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        """Unary ModelInfer, read lazily: refused unread while the budget is spent, charged its size from
        the moment it is read until its answer (also charged) has been sent."""
        dataplane, budget = self.dataplane, self.dataplane.budget
        try:
            dataplane.admit_unread("ModelInfer")
        except ServingError as err:
            await self._abort(context, err)
        expected, raw = budget.start_read(), grpc.aio.EOF
        try:
            raw = await context.read()
        finally:
            budget.end_read(expected, len(raw) if isinstance(raw, bytes) else None)
        if raw is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before a ModelInferRequest")
        held = len(raw)
        try:
            dataplane.hold("ModelInfer", held)
        except ServingError as err:
            await self._abort(context, err)

        def release(_context) -> None:
            budget.release(held)

        context.add_done_callback(release)
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError as err:
            await self.refuse_malformed("ModelInfer", pb.ModelInferRequest, context, err)
        del raw  # parsed: the message owns the tensors now
        infer = dataplane.infer(to_request(request), context.time_remaining(), _serialized_response)
        del request  # the data plane lets go of the tensors' wire form once they are decoded
        try:
            response = await infer
        except ServingError as err:
            await self._abort(context, err)
        budget.charge(len(response))
        held += len(response)
        return response

    async def ModelStreamInfer(self, requests, context: grpc.aio.ServicerContext) -> None:
        """Pipelined through the data plane (answers in request order, failures in-band). A message that
        does not parse ends the stream with INVALID_ARGUMENT after everything before it was answered."""
        end = await self.dataplane.stream(_Stream(context))
        if end.malformed:
            self._end_malformed(context, end)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"message {end.index} of this stream is not a valid inference.ModelInferRequest protobuf message; "
                f"the stream ends here (the {end.index - 1} requests before it were answered)",
            )
        if end.error is not None:
            await self._abort(context, end.error)

    def _end_malformed(self, context: grpc.aio.ServicerContext, end: StreamEnd) -> None:
        self._limited_log.warning(
            "malformed_stream_message", "method=ModelStreamInfer message=%d peer=%s", end.index, context.peer()
        )

    # --------------------------------------------------------- registration

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Handlers for every method, keyed by short name, for registration under SERVICE_NAME.

        None has a request deserializer (each parses its bytes); ModelInfer is client-streaming on this
        side (read lazily) and returns serialized bytes, as ModelStreamInfer writes them.
        """
        handlers = {}
        for name, method in METHODS.items():
            if name == "ModelInfer":
                handlers[name] = grpc.stream_unary_rpc_method_handler(self.ModelInfer)
            elif name == "ModelStreamInfer":
                handlers[name] = grpc.stream_stream_rpc_method_handler(self.ModelStreamInfer)
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(name, method.request, getattr(self, name)),
                    response_serializer=method.response.SerializeToString,
                )
        return handlers

    def _unary(
        self, name: str, message: type[Message], handler: Callable[[Message, grpc.aio.ServicerContext], Awaitable]
    ) -> Callable:
        """Parse the request bytes (malformed: INVALID_ARGUMENT), run ``handler``, and turn an unexpected
        exception into INTERNAL (never UNKNOWN with our internals)."""

        async def unary(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                request = message.FromString(raw)
            except DecodeError as err:
                await self.refuse_malformed(name, message, context, err)
            try:
                return await handler(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as err:  # noqa: BLE001
                error = internal_error(getattr(request, "name", "") or getattr(request, "model_name", ""), err)
                await context.abort(grpc.StatusCode.INTERNAL, str(error))

        unary.__name__ = name
        return unary
