"""The gRPC adapter: protobuf in, core calls, protobuf out; core errors become status codes.

Handlers are registered under the standard ``inference.GRPCInferenceService``
name (see tensorwire.proto.service). Everything model-related is delegated to
the ModelManager; this module only translates.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from tensorwire import __version__
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import DATATYPES, CodecError, decode_contents, decode_raw
from tensorwire.proto.service import METHODS
from tensorwire.repository import ModelConfigFile
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelUnavailableError,
    QueueFullError,
    ServingError,
)
from tensorwire.server.manager import ModelManager
from tensorwire.server.model_version import ModelVersion
from tensorwire.server.signature import check_input, check_rows

log = logging.getLogger("tensorwire.servicer")

EXTENSIONS = ["model_repository", "model_configuration", "schedule_policy", "parameters", "statistics"]
_CONFIG_TYPES = {name: getattr(pb, f"TYPE_{'STRING' if name == 'BYTES' else name}") for name in DATATYPES}
_KINDS = {
    "cpu": pb.ModelInstanceGroup.KIND_CPU,
    "gpu": pb.ModelInstanceGroup.KIND_GPU,
    "auto": pb.ModelInstanceGroup.KIND_AUTO,
}
#: Request parameters we act on; others (e.g. binary_data_output) are accepted and ignored.
_UNSUPPORTED_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end"}
_STREAM_WINDOW = 1024  # in-flight requests per stream before we stop reading (backpressure)


@dataclass(eq=False)
class _StreamItem:
    """One request of a stream on its way: queued in a batcher (``future``) or already failed."""

    request: pb.ModelInferRequest
    started: int
    version: ModelVersion | None = None
    core: InferenceRequest | None = None
    future: asyncio.Future | None = None
    error: ServingError | None = None


def status_of(err: ServingError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status)


class Servicer:
    """Implements every RPC of the service on top of a ModelManager."""

    def __init__(
        self, manager: ModelManager, on_repository_change: Callable[[], None] = lambda: None
    ) -> None:
        self.manager = manager
        self.draining = False
        self.started = False
        self._on_repository_change = on_repository_change

    # ----------------------------------------------------------- helpers

    async def _abort(self, context: grpc.aio.ServicerContext, err: ServingError) -> None:
        if isinstance(err, QueueFullError):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_after_ms)),))
        await context.abort(status_of(err), str(err))

    # -------------------------------------------------------------- health

    async def ServerLive(self, request: pb.ServerLiveRequest, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        # Strict readiness (the default) also needs every model READY: ModelManager.models_ready.
        ready = self.started and not self.draining and self.manager.models_ready()
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        try:
            self.manager.resolve(request.name, request.version)
        except ModelUnavailableError:
            return pb.ModelReadyResponse(ready=False)
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelReadyResponse(ready=not self.draining)

    # ------------------------------------------------------------ metadata

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tensorwire", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        try:
            version = self.manager.resolve(request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        sig = version.signature
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=version.name,
            versions=[str(v) for v in self.manager.ready_versions(version.name)],
            platform=version.config.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=sig.served_shape(t)) for t in sig.inputs],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=sig.served_shape(t)) for t in sig.outputs
            ],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        try:
            version = self.manager.resolve(request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelConfigResponse(config=model_config_proto(version))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context
    ) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                if request.version:
                    versions = [self.manager.resolve(request.name, request.version)]
                else:
                    self.manager.resolve(request.name)
                    versions = [v for v in self.manager.served_versions() if v.name == request.name]
            else:
                versions = self.manager.served_versions()
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelStatisticsResponse(model_stats=[v.stats.to_proto() for v in versions])

    # ---------------------------------------------------------- repository

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context
    ) -> pb.RepositoryIndexResponse:
        rows = self.manager.index()
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=name, version=version, state=state, reason=reason)
                for name, version, state, reason in rows
                if not request.ready or state == "READY"
            ]
        )

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context):
        if request.parameters:
            await self._abort(
                context,
                InvalidRequestError(
                    f"load parameters {sorted(request.parameters)} are not supported; edit config.toml and load again"
                ),
            )
        try:
            await self.manager.load(request.model_name)
        except ServingError as err:
            await self._abort(context, err)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context):
        try:
            await self.manager.unload(request.model_name)
        except ServingError as err:
            await self._abort(context, err)
        finally:
            self._on_repository_change()
        return pb.RepositoryModelUnloadResponse()

    # ----------------------------------------------------------- inference

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        started = time.perf_counter_ns()
        version: ModelVersion | None = None
        try:
            version = self.manager.resolve(request.model_name, request.model_version)
            core = build_request(version, request, context.time_remaining())
            outputs = await version.infer(core)
        except ServingError as err:
            if version is not None and err.status not in ("INTERNAL", "DEADLINE_EXCEEDED"):
                version.stats.record_failure(time.perf_counter_ns() - started, err.status.lower())
            await self._abort(context, err)
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            await self._abort(context, internal_error(request.model_name, err))
        response = build_response(version, request.id, outputs)
        version.stats.record_success(time.perf_counter_ns() - started)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context):
        """Pipelined: each request is queued for batching as soon as it is read, and the answers
        go back in request order; a failed request is answered in-band and the stream goes on."""
        pending: asyncio.Queue[_StreamItem | None] = asyncio.Queue(maxsize=_STREAM_WINDOW)

        async def read() -> None:
            async for request in requests:
                await pending.put(self._stream_submit(request))
            await pending.put(None)

        reader = asyncio.ensure_future(read())
        current: _StreamItem | None = None
        try:
            while True:
                current = await pending.get()
                if current is None:
                    break
                yield await self._stream_answer(current)
            await reader
        finally:
            reader.cancel()
            leftovers = [current] if current is not None else []
            while not pending.empty():
                leftovers.append(pending.get_nowait())
            for item in leftovers:
                if item is not None and item.core is not None:
                    item.version.batcher.cancel(item.core)  # the caller went away: never run these

    def _stream_submit(self, request: pb.ModelInferRequest) -> _StreamItem:
        """Validate and queue one stream request without waiting for it (no task per message)."""
        item = _StreamItem(request, time.perf_counter_ns())
        try:
            item.version = self.manager.resolve(request.model_name, request.model_version)
            item.core = build_request(item.version, request, None)
            item.future = item.version.batcher.submit(item.core)
        except ServingError as err:
            item.error, item.core = err, None
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            item.error, item.core = internal_error(request.model_name, err), None
        return item

    async def _stream_answer(self, item: _StreamItem) -> pb.ModelStreamInferResponse:
        request, version = item.request, item.version
        if item.error is None:
            try:
                outputs = await item.future
                item.core = None
            except ServingError as err:
                item.error, item.core = err, None
            else:
                response = build_response(version, request.id, outputs)
                version.stats.record_success(time.perf_counter_ns() - item.started)
                return pb.ModelStreamInferResponse(infer_response=response)
        err = item.error
        if version is not None and err.status not in ("INTERNAL", "DEADLINE_EXCEEDED"):
            version.stats.record_failure(time.perf_counter_ns() - item.started, err.status.lower())
        return pb.ModelStreamInferResponse(
            error_message=f"{err.status}: {err}",
            infer_response=pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            ),
        )

    # --------------------------------------------------------- registration

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Handlers for every method, keyed by short name, for registration under SERVICE_NAME."""
        handlers = {}
        for name, method in METHODS.items():
            factory = (
                grpc.stream_stream_rpc_method_handler
                if method.client_streaming
                else (grpc.unary_unary_rpc_method_handler)
            )
            behaviour = getattr(self, name)
            if name not in ("ModelInfer", "ModelStreamInfer"):  # those two guard themselves, inline
                behaviour = _guarded(behaviour)
            handlers[name] = factory(
                behaviour,
                request_deserializer=method.request.FromString,
                response_serializer=method.response.SerializeToString,
            )
        return handlers


def internal_error(model: str, err: Exception) -> ServingError:
    """An unexpected exception: log the traceback, tell the caller only that it happened and where."""
    log.error("event=internal_error model=%s error=%r", model, err, exc_info=err)
    error = ServingError(
        f"internal error while serving model {model!r} ({type(err).__name__}); see the server log"
    )
    return error


def _guarded(handler: Callable) -> Callable:
    """Turn an unexpected exception in a unary handler into INTERNAL (never UNKNOWN with our internals)."""

    async def guarded(request, context):
        try:
            return await handler(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:  # noqa: BLE001
            error = internal_error(getattr(request, "name", "") or getattr(request, "model_name", ""), err)
            await context.abort(grpc.StatusCode.INTERNAL, str(error))

    guarded.__name__ = getattr(handler, "__name__", "handler")
    return guarded


# ------------------------------------------------------------- conversions


def _parameter_value(name: str, parameter: pb.InferParameter) -> object:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        raise InvalidRequestError(f"parameter {name!r} has no value set (unknown parameter type)")
    return getattr(parameter, choice)


def _int_parameter(name: str, parameter: pb.InferParameter) -> int:
    value = _parameter_value(name, parameter)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"parameter {name!r} must be a non-negative int64 or uint64, got {value!r}")
    return value


def _check_utf8(name: str, array) -> None:
    for index, element in enumerate(array.flat):
        try:
            element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(
                f"input {name!r} element {index} is not UTF-8; this model's string tensors hold text"
            ) from None


def _request_parameters(version: ModelVersion, request: pb.ModelInferRequest) -> tuple[int, int | None]:
    """The request's (priority, timeout_us) parameters; other known-typed parameters are ignored."""
    settings = version.config.dynamic_batching
    priority, timeout_us = 0, None
    for name, parameter in request.parameters.items():
        value = _parameter_value(name, parameter)
        if name == "priority":
            priority = _int_parameter(name, parameter)
            if priority > settings.priority_levels:
                raise InvalidRequestError(
                    f"priority {priority} is beyond the model's priority_levels {settings.priority_levels} "
                    "(1 is highest, 0 the default)"
                )
        elif name == "timeout":
            timeout_us = _int_parameter(name, parameter)
        elif name in _UNSUPPORTED_PARAMETERS and value:
            raise InvalidRequestError(f"parameter {name!r}: sequence batching is not supported by tensorwire")
    return priority, timeout_us


def build_request(
    version: ModelVersion, request: pb.ModelInferRequest, time_remaining: float | None
) -> InferenceRequest:
    """Validate and decode a ModelInferRequest into a core request (zero-copy for raw tensors).

    One pass over the inputs; each is checked against the signature before its bytes are decoded.
    This runs for every request on the event loop, so it is kept lean.
    """
    sig = version.signature
    priority, timeout_us = _request_parameters(version, request) if request.parameters else (0, None)
    raw = request.raw_input_contents
    inputs = request.inputs
    if raw and len(raw) != len(inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries for {len(inputs)} inputs; send one per input, in order"
        )
    arrays: dict[str, np.ndarray] = {}
    rows_by_input: dict[str, int] = {}
    key = []
    for index, tensor in enumerate(inputs):
        name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
        if name in arrays:
            raise InvalidRequestError(f"input {name!r} appears twice")
        check_input(sig, name, datatype, shape)
        if tensor.parameters:
            for pname, parameter in tensor.parameters.items():
                _parameter_value(f"{name}.{pname}", parameter)
        try:
            if raw:
                if tensor.HasField("contents"):
                    raise InvalidRequestError(
                        f"input {name!r} has both contents and raw_input_contents; send one"
                    )
                array = decode_raw(raw[index], datatype, shape)
            else:
                array = decode_contents(tensor.contents, datatype, shape)
        except CodecError as err:
            raise InvalidRequestError(f"input {name!r}: {err}") from None
        if name in version.utf8_inputs:
            _check_utf8(name, array)
        arrays[name] = array
        if sig.batched:
            rows_by_input[name] = shape[0]
            key.append((name, shape[1:]))
        else:
            key.append((name, shape))
    if len(arrays) != len(sig.inputs):
        missing = [t.name for t in sig.inputs if t.name not in arrays]
        raise InvalidRequestError(f"missing inputs {missing}; the model needs {[t.name for t in sig.inputs]}")
    rows = check_rows(sig, rows_by_input)
    outputs = sig.output_names
    if request.outputs:
        outputs = []
        for tensor in request.outputs:
            if tensor.name not in sig.output_names:
                raise InvalidRequestError(
                    f"unknown output {tensor.name!r}; the model's outputs are {sig.output_names}"
                )
            outputs.append(tensor.name)
    deadline = None
    default_timeout_us = version.config.dynamic_batching.default_timeout_us
    if time_remaining is not None or timeout_us or default_timeout_us:
        limits = [time_remaining] if time_remaining is not None else []
        if timeout_us or (default_timeout_us and timeout_us is None):
            limits.append((timeout_us or default_timeout_us) / 1e6)
        remaining = min(limits)
        if remaining <= 0:
            raise DeadlineExceededError("the request's deadline had already passed when it arrived")
        deadline = version.loop.time() + remaining
    return InferenceRequest(
        arrays, rows, outputs, request.id, version.batcher.priority_index(priority), deadline, tuple(key)
    )


def build_response(version: ModelVersion, request_id: str, outputs: list) -> pb.ModelInferResponse:
    tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=version.name,
        model_version=str(version.version),
        id=request_id,
        outputs=[tensor(name=name, datatype=datatype, shape=shape) for name, datatype, shape, _ in outputs],
        raw_output_contents=[raw for _, _, _, raw in outputs],
    )


def _reshape(config: ModelConfigFile, name: str) -> pb.ModelTensorReshape | None:
    """Triton's reshape of a tensor, when the configuration gives one (the model file's shape)."""
    spec = config.tensor_spec(name)
    return pb.ModelTensorReshape(shape=spec.reshape) if spec is not None and spec.reshape is not None else None


def model_config_proto(version: ModelVersion) -> pb.ModelConfig:
    """Triton's ModelConfig subset, filled from config.toml and the resolved signature."""
    config, sig = version.config, version.signature
    policy = config.version_policy
    if policy.latest is not None:
        version_policy = pb.ModelVersionPolicy(
            latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest)
        )
    elif policy.all:
        version_policy = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    else:
        version_policy = pb.ModelVersionPolicy(
            specific=pb.ModelVersionPolicy.Specific(versions=policy.specific)
        )
    message = pb.ModelConfig(
        name=version.name,
        platform=config.platform,
        backend=config.backend,
        version_policy=version_policy,
        max_batch_size=config.max_batch_size,
        input=[
            pb.ModelInput(
                name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.dims, reshape=_reshape(config, t.name)
            )
            for t in sig.inputs
        ],
        output=[
            pb.ModelOutput(
                name=t.name, data_type=_CONFIG_TYPES[t.datatype], dims=t.dims, reshape=_reshape(config, t.name)
            )
            for t in sig.outputs
        ],
        instance_group=[
            pb.ModelInstanceGroup(
                name=f"{version.name}_{i}", kind=_KINDS[g.kind], count=g.count, gpus=g.gpus or []
            )
            for i, g in enumerate(config.instance_group)
        ],
        default_model_filename=config.model_filename,
        parameters={k: pb.ModelParameter(string_value=v) for k, v in config.metadata.items()},
    )
    if config.batching:
        b = config.dynamic_batching
        message.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=b.preferred_batch_sizes,
                max_queue_delay_microseconds=b.max_queue_delay_us,
                priority_levels=b.priority_levels,
                default_priority_level=b.default_priority_level,
                default_queue_policy=pb.ModelQueuePolicy(
                    default_timeout_microseconds=b.default_timeout_us,
                    max_queue_size=b.max_queue_size,
                    allow_timeout_override=True,
                ),
            )
        )
    return message
