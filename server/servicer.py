"""The gRPC adapter: protobuf in, core calls, protobuf out; core errors become status codes.

Handlers are registered under the standard ``inference.GRPCInferenceService`` name (see
tensorwire.proto.service). Everything model-related is delegated to the ModelManager; this module only
translates, and it is where each request's fate is counted (statistics) and its memory charged (budget).

Every handler receives the raw request bytes and parses them itself, so a message that is not protobuf is
answered INVALID_ARGUMENT with at most a rate-limited log line (gRPC's own deserializer would answer
UNKNOWN and log a traceback per message). ModelInfer is registered as a client-streaming handler: gRPC
reads a message only when asked, so a call that arrives while the in-flight memory budget is spent is
refused before its body is taken in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from tensorwire import __version__
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import DATATYPES, CodecError, decode_contents, decode_raw
from tensorwire.proto.service import METHODS
from tensorwire.repository import ModelConfigFile
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.budget import InflightBudget, MemoryBudgetError, default_budget_bytes
from tensorwire.server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ServingError,
)
from tensorwire.server.lograte import RateLimitedLog
from tensorwire.server.manager import ModelManager
from tensorwire.server.model_version import ModelVersion
from tensorwire.server.signature import check_input, check_rows
from tensorwire.server.stats import failure_reason

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
_MAX_VERSION = 2**63 - 1  # versions are int64 on the wire (Triton's GetModelVersionFromString)


@dataclass(eq=False)
class _StreamItem:
    """One request of a stream on its way: queued in a batcher (``future``) or already failed.

    Only what the answer echoes is kept of the message (its tensors live on in ``core``). ``held`` is what
    it is charged against the memory budget; ``version`` is set once the request resolved (its statistics
    then expect exactly one outcome: ``recorded`` says it was given).
    """

    request_id: str
    model_name: str
    model_version: str
    started: int
    held: int = 0
    version: ModelVersion | None = None
    core: InferenceRequest | None = None
    future: asyncio.Future | None = None
    error: ServingError | None = None
    recorded: bool = False


@dataclass(frozen=True)
class _StreamEnd:
    """The reader's last word after ``index`` messages: the caller half-closed, message ``index`` did not
    parse (``malformed``), or reading failed (``error``)."""

    index: int = 0
    malformed: bool = False
    error: ServingError | None = None


def status_of(err: ServingError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, err.status)


def check_version_string(version: str) -> None:
    """Refuse a version string that is not a version number (INVALID_ARGUMENT), as Triton does.

    '' means the latest ready version; otherwise ASCII decimal digits of an int64. Triton refuses '-1'
    and non-numbers the same way, but reads ' 1' or '1.0' as 1 (C's ``stol``); tensorwire refuses those.
    """
    if not version or (version.isascii() and version.isdigit() and int(version) <= _MAX_VERSION):
        return
    shown = version if len(version) <= 40 else version[:40] + "..."
    raise InvalidRequestError(
        f"model version {shown!r} is not a version number: versions are integers > 0 "
        "(or '' for the latest ready version); Triton refuses it too"
    )


class Servicer:
    """Implements every RPC of the service on top of a ModelManager.

    ``budget`` bounds the bytes held by inference calls in flight (default: ``default_budget_bytes()``).
    """

    def __init__(
        self,
        manager: ModelManager,
        on_repository_change: Callable[[], None] = lambda: None,
        budget: InflightBudget | None = None,
    ) -> None:
        self.manager = manager
        self.metrics = manager.metrics
        self.budget = budget or InflightBudget(default_budget_bytes())
        self.draining = False
        self.started = False
        self._on_repository_change = on_repository_change
        self._limited_log = RateLimitedLog(log)

    # ----------------------------------------------------------- helpers

    async def _abort(self, context: grpc.aio.ServicerContext, err: ServingError) -> None:
        if isinstance(err, QueueFullError):
            context.set_trailing_metadata((("grpc-retry-pushback-ms", str(err.retry_after_ms)),))
        await context.abort(status_of(err), str(err))

    def _resolve(self, method: str, name: str, version: str = "") -> ModelVersion:
        """The version serving a call; a refusal (bad version string, unknown or not ready) is counted
        under ``method`` and raised."""
        try:
            check_version_string(version)
            return self.manager.resolve(name, version)
        except ServingError as err:
            self.metrics.refuse(method, failure_reason(err))
            raise

    async def refuse_malformed(
        self, method: str, message: type[Message], context: grpc.aio.ServicerContext, err: Exception
    ) -> None:
        """Refuse a message that does not parse: INVALID_ARGUMENT, counted under ``method``, at most a log
        line per interval. Raises grpc.aio.AbortError (the call is over)."""
        self.metrics.refuse(method, "malformed")
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
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context) -> pb.ServerReadyResponse:
        # Strict readiness (the default) also needs every model READY: ModelManager.models_ready.
        ready = self.started and not self.draining and self.manager.models_ready()
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        """ready=false for anything that cannot serve now, unknown models and versions included (Triton's
        answer, which wait-until-ready loops rely on); INVALID_ARGUMENT for a version that is not a number."""
        try:
            check_version_string(request.version)
            self.manager.resolve(request.name, request.version)
        except (ModelUnavailableError, ModelNotFoundError):
            return pb.ModelReadyResponse(ready=False)
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelReadyResponse(ready=self.started and not self.draining)

    # ------------------------------------------------------------ metadata

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="tensorwire", version=__version__, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context) -> pb.ModelMetadataResponse:
        try:
            version = self._resolve("ModelMetadata", request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        sig = version.signature
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=version.name,
            versions=[str(v) for v in self.manager.ready_versions(version.name)],
            platform=version.config.platform,
            inputs=[tensor(name=t.name, datatype=t.datatype, shape=sig.served_shape(t)) for t in sig.inputs],
            outputs=[tensor(name=t.name, datatype=t.datatype, shape=sig.served_shape(t)) for t in sig.outputs],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context) -> pb.ModelConfigResponse:
        try:
            version = self._resolve("ModelConfig", request.name, request.version)
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelConfigResponse(config=model_config_proto(version))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context) -> pb.ModelStatisticsResponse:
        try:
            if request.name:
                if request.version:
                    versions = [self._resolve("ModelStatistics", request.name, request.version)]
                else:
                    self._resolve("ModelStatistics", request.name)
                    versions = [v for v in self.manager.served_versions() if v.name == request.name]
            else:
                versions = self.manager.served_versions()
        except ServingError as err:
            await self._abort(context, err)
        return pb.ModelStatisticsResponse(model_stats=[v.stats.to_proto() for v in versions])

    # ---------------------------------------------------------- repository

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context) -> pb.RepositoryIndexResponse:
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

    async def ModelInfer(self, requests, context: grpc.aio.ServicerContext) -> bytes:
        """Unary ModelInfer, read lazily: refused unread while the budget is spent, charged its size from
        the moment it is read until its answer (also charged) has been sent."""
        budget = self.budget
        if budget.spent:
            self.metrics.refuse("ModelInfer", "memory_budget")
            await self._abort(context, budget.refusal())
        expected, raw = budget.start_read(), grpc.aio.EOF
        try:
            raw = await context.read()
        finally:
            budget.end_read(expected, len(raw) if isinstance(raw, bytes) else None)
        if raw is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call ended before a ModelInferRequest")
        held = len(raw)
        try:
            budget.acquire(held)
        except MemoryBudgetError as err:
            self.metrics.refuse("ModelInfer", "memory_budget")
            await self._abort(context, err)

        def release(_context) -> None:
            budget.release(held)

        context.add_done_callback(release)
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError as err:
            await self.refuse_malformed("ModelInfer", pb.ModelInferRequest, context, err)
        del raw  # parsed: the message owns the tensors now
        infer = self._infer(request, context)
        del request  # _infer lets go of it once the tensors are decoded
        try:
            response = (await infer).SerializeToString()
        except ServingError as err:
            await self._abort(context, err)
        budget.charge(len(response))
        held += len(response)
        return response

    async def _infer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        """Resolve, validate, queue and await one request; its outcome is counted exactly once.

        The message is dropped as soon as its tensors are decoded: while the request waits and runs, only
        the decoded tensors (and a few strings) stay in memory."""
        started = time.perf_counter_ns()
        request_id, model_name = request.id, request.model_name
        version = self._resolve("ModelInfer", model_name, request.model_version)
        stats = version.stats
        stats.begin()
        try:
            core = build_request(version, request, context.time_remaining())
            del request
            outputs = await version.infer(core)
            response = build_response(version, request_id, outputs)
        except asyncio.CancelledError:
            stats.record_failure(time.perf_counter_ns() - started, "cancelled")
            raise
        except ServingError as err:
            stats.record_failure(time.perf_counter_ns() - started, failure_reason(err))
            raise
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            stats.record_failure(time.perf_counter_ns() - started, "internal")
            raise internal_error(model_name, err) from None
        stats.record_success(time.perf_counter_ns() - started)
        return response

    async def ModelStreamInfer(self, requests, context: grpc.aio.ServicerContext) -> None:
        """Pipelined: each request is queued for batching as soon as it is read, with the call's deadline,
        and the answers go back in request order, each echoing its request's id; a failed request is
        answered in-band and the stream goes on. A message that does not parse ends the stream
        (INVALID_ARGUMENT, after answering everything before it). When the stream ends for any reason,
        requests still queued are withdrawn: nothing runs for a caller that is gone."""
        pending: asyncio.Queue[_StreamItem | _StreamEnd] = asyncio.Queue(maxsize=_STREAM_WINDOW)

        async def read() -> None:
            index = 0
            try:
                while True:
                    raw = await context.read()
                    if raw is grpc.aio.EOF:
                        await pending.put(_StreamEnd(index))
                        return
                    index += 1
                    try:
                        request = pb.ModelInferRequest.FromString(raw)
                    except DecodeError:
                        await pending.put(_StreamEnd(index, malformed=True))
                        return
                    item = self._stream_submit(request, len(raw), context.time_remaining())
                    try:
                        await pending.put(item)
                    except asyncio.CancelledError:
                        self._stream_withdraw(item)
                        raise
            except Exception as err:  # noqa: BLE001 - the stream must end with a status, never hang
                await pending.put(_StreamEnd(index, error=internal_error("(stream)", err)))

        reader = asyncio.ensure_future(read())
        current: _StreamItem | _StreamEnd | None = None
        try:
            while True:
                current = await pending.get()
                if isinstance(current, _StreamEnd):
                    break
                await context.write(await self._stream_answer(current))
                self.budget.release(current.held)
                current.held = 0
                current = None
            end, current = current, None
            if end.malformed or end.error is not None:
                await self._end_stream(context, end)
        finally:
            reader.cancel()
            leftovers = [current] if current is not None else []
            while not pending.empty():
                leftovers.append(pending.get_nowait())
            for item in leftovers:
                if isinstance(item, _StreamItem):
                    self._stream_withdraw(item)

    async def _end_stream(self, context: grpc.aio.ServicerContext, end: _StreamEnd) -> None:
        """End a stream whose message ``end.index`` could not be read: a status and a (rate-limited) line."""
        if end.malformed:
            self.metrics.refuse("ModelStreamInfer", "malformed")
            self._limited_log.warning(
                "malformed_stream_message", "method=ModelStreamInfer message=%d peer=%s", end.index, context.peer()
            )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"message {end.index} of this stream is not a valid inference.ModelInferRequest protobuf message; "
                f"the stream ends here (the {end.index - 1} requests before it were answered)",
            )
        await self._abort(context, end.error)

    def _stream_submit(self, request: pb.ModelInferRequest, size: int, time_remaining: float | None) -> _StreamItem:
        """Charge, resolve, validate and queue one stream request without waiting for it (no task per
        message); failures are kept on the item and answered in order."""
        item = _StreamItem(request.id, request.model_name, request.model_version, time.perf_counter_ns())
        try:
            self.budget.acquire(size)
        except MemoryBudgetError as err:
            self.metrics.refuse("ModelStreamInfer", "memory_budget")
            item.error = err
            return item
        item.held = size
        try:
            item.version = self._resolve("ModelStreamInfer", request.model_name, request.model_version)
        except ServingError as err:
            item.error = err
            return item
        item.version.stats.begin()
        try:
            item.core = build_request(item.version, request, time_remaining)
            item.future = item.version.batcher.submit(item.core)
        except ServingError as err:
            item.error, item.core = err, None
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            item.error, item.core = internal_error(request.model_name, err), None
        return item

    async def _stream_answer(self, item: _StreamItem) -> bytes:
        """The serialized answer to one stream item (its outputs or its error, with the request's id)."""
        version = item.version
        if item.error is None:
            try:
                outputs = await item.future
            except ServingError as err:
                item.error = err
            else:
                item.core = None
                try:
                    response = build_response(version, item.request_id, outputs)
                except Exception as err:  # noqa: BLE001 - a bug of ours
                    item.error = internal_error(item.model_name, err)
                else:
                    self._stream_outcome(item, None)
                    answer = pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
                    self.budget.charge(len(answer))
                    item.held += len(answer)
                    return answer
            item.core = None
        err = item.error
        self._stream_outcome(item, err)
        return pb.ModelStreamInferResponse(
            error_message=f"{err.status}: {err}",
            infer_response=pb.ModelInferResponse(
                model_name=item.model_name, model_version=item.model_version, id=item.request_id
            ),
        ).SerializeToString()

    def _stream_outcome(self, item: _StreamItem, err: ServingError | None, reason: str | None = None) -> None:
        """Count how a resolved stream item ended (once)."""
        if item.version is None or item.recorded:
            return
        item.recorded = True
        elapsed = time.perf_counter_ns() - item.started
        if err is None and reason is None:
            item.version.stats.record_success(elapsed)
        else:
            item.version.stats.record_failure(elapsed, reason or failure_reason(err))

    def _stream_withdraw(self, item: _StreamItem) -> None:
        """The stream is gone: take the item out of its batcher (it never runs if still queued), count it
        cancelled unless it was answered, and release its memory."""
        if item.core is not None and item.version is not None:
            item.version.batcher.cancel(item.core)
            item.core = None
        self._stream_outcome(item, None, "cancelled")
        if item.held:
            self.budget.release(item.held)
            item.held = 0

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


def internal_error(model: str, err: Exception) -> ServingError:
    """An unexpected exception: log the traceback, tell the caller only that it happened and where."""
    log.error("event=internal_error model=%s error=%r", model, err, exc_info=err)
    error = ServingError(f"internal error while serving model {model!r} ({type(err).__name__}); see the server log")
    return error


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
                    "(1 is highest, 0 the model's default level); Triton would run it at the default level "
                    "silently: send 0 for that"
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
                    raise InvalidRequestError(f"input {name!r} has both contents and raw_input_contents; send one")
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
                raise InvalidRequestError(f"unknown output {tensor.name!r}; the model's outputs are {sig.output_names}")
            if tensor.name in outputs:
                raise InvalidRequestError(
                    f"output {tensor.name!r} is requested twice; name each output once (Triton refuses this too)"
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
        version_policy = pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest))
    elif policy.all:
        version_policy = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    else:
        version_policy = pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=policy.specific))
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
            pb.ModelInstanceGroup(name=f"{version.name}_{i}", kind=_KINDS[g.kind], count=g.count, gpus=g.gpus or [])
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
