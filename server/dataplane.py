"""The data plane: every request rule, once, for both front-ends (gRPC and HTTP/REST).

A front-end only converts its wire format into the neutral request below and maps the core errors
(``errors.ServingError``, each naming its gRPC status) to its own status codes. Everything else is decided
here, over an :class:`~tensorwire.server.engine.Engine`:

- which version serves a call, and counting the calls refused before one resolved (reason vocabulary:
  ``stats.REASONS``); version strings are checked as Triton checks them;
- validation against the served signature and decoding, in one pass, before anything is queued (so one
  bad request never fails a batch), UTF-8 for string tensors of models that hold text;
- the request's parameters: ``priority`` (1 = highest, 0 = the model's default), ``timeout`` (µs), the
  sequence parameters refused;
- the deadline: the smallest of the transport's deadline (gRPC's), the request's ``timeout`` parameter and,
  without that parameter, the model's ``default_timeout_us``; one already passed is DEADLINE_EXCEEDED;
- the server-wide memory budget for request and answer bytes in flight;
- how each request ended, counted exactly once (``begin`` then success or failure with its reason; by the
  engine itself for requests that reached an engine whose versions say ``counts_outcomes``);
- streams: requests queued as they are read (at most ``STREAM_WINDOW`` ahead of the answers), answers in
  request order, failures answered in-band, and whatever is still queued withdrawn when the stream ends;
- readiness: live while the process serves (loading and draining included); ready once started, not
  draining and the models ready (strict readiness by default).

The neutral request holds each input's bytes as the wire carried them with the function that decodes them
(raw contents, protobuf typed contents, JSON values): the front-end never validates, and the data plane
checks each input's name, datatype and shape before its bytes are decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np

from tensorwire import __version__
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import CodecError
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.budget import InflightBudget, MemoryBudgetError
from tensorwire.server.engine import Engine, ServedVersion
from tensorwire.server.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServingError,
)
from tensorwire.server.model_config import model_config_proto
from tensorwire.server.replicas import EncodedTensor
from tensorwire.server.signature import check_input, check_rows
from tensorwire.server.stats import failure_reason

log = logging.getLogger("tensorwire.dataplane")

#: Protocol extensions ServerMetadata advertises (Triton's names; perf_analyzer reads ``statistics``).
EXTENSIONS = ["model_repository", "model_configuration", "schedule_policy", "parameters", "statistics"]
#: Requests of one stream queued ahead of its answers before reading pauses (backpressure).
STREAM_WINDOW = 1024
#: Request parameters that ask for sequence batching, which tensorwire does not have.
_SEQUENCE_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end"}
#: Versions are int64 on the wire (Triton's GetModelVersionFromString).
_MAX_VERSION = 2**63 - 1
_PARAMETER_TYPES = (bool, int, float, str)

T = TypeVar("T")


class _Unset:
    """The value of a parameter whose wire form carried no value of a known type."""

    def __repr__(self) -> str:
        return "<no value>"


#: A parameter the wire carried without a value of a known type (gRPC's InferParameter with no choice set).
UNSET: Any = _Unset()

#: ``decode(data, datatype, shape) -> array``; raises CodecError when the bytes do not fit the declaration.
Decoder = Callable[[Any, str, tuple[int, ...]], np.ndarray]


class InputTensor(NamedTuple):
    """One input as the wire carried it: declared name, datatype and shape (batch dimension included for
    batched models), its ``data`` in wire form and the ``decode`` function that reads it. ``parameters``
    hold Python values (bool, int, float, str) or ``UNSET``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any
    decode: Decoder
    parameters: Mapping[str, Any] | None = None


class InferRequest:
    """A transport-neutral inference request, built by a front-end from its wire format without validation.

    ``outputs``: the requested output names in order (None: all of them). ``parameters``: Python values
    (bool, int, float, str) or ``UNSET``. ``wire_error``: a problem the front-end found in the request's
    wire form (counts that do not match, two forms of one tensor); it is raised once the model resolved, so
    the request is counted like any other invalid one. The data plane lets go of ``inputs`` once decoded.
    """

    __slots__ = ("model_name", "model_version", "id", "inputs", "outputs", "parameters", "wire_error")

    def __init__(
        self,
        model_name: str,
        model_version: str,
        request_id: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[str] | None = None,
        parameters: Mapping[str, Any] | None = None,
        wire_error: ServingError | None = None,
    ) -> None:
        self.model_name = model_name
        self.model_version = model_version
        self.id = request_id
        self.inputs = inputs
        self.outputs = outputs
        self.parameters = parameters
        self.wire_error = wire_error


@dataclass(frozen=True)
class TensorMetadata:
    """A tensor in ModelMetadata: ``shape`` starts with -1 (the batch dimension) for batched models."""

    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMetadata:
    """What ModelMetadata answers: the model's name, its READY versions, platform and tensors."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class IndexRow:
    """One RepositoryIndex entry: a model (``version`` '' for a model without version records) and state."""

    name: str
    version: str
    state: str
    reason: str


class MalformedMessage(Exception):
    """Raised by a stream transport's ``read`` for a message that is not a request of the method's type."""


class StreamTransport(Protocol):
    """A front-end's side of one stream of inference requests (gRPC's ModelStreamInfer)."""

    async def read(self) -> tuple[InferRequest, int] | None:
        """The next request and its size in bytes; None once the caller half-closed. Raises MalformedMessage."""
        ...

    def time_remaining(self) -> float | None:
        """Seconds left before the call's deadline (None: no deadline)."""
        ...

    def encode_answer(self, version: ServedVersion, request_id: str, outputs: list[EncodedTensor]) -> bytes:
        """The serialized answer carrying ``outputs``."""
        ...

    def encode_error(self, model_name: str, model_version: str, request_id: str, err: ServingError) -> bytes:
        """The serialized in-band answer for a request that failed with ``err`` (the stream goes on)."""
        ...

    async def write(self, answer: bytes) -> None:
        """Send one answer."""
        ...


@dataclass(frozen=True)
class StreamEnd:
    """How a stream ended after ``index`` messages: the caller half-closed, message ``index`` did not parse
    (``malformed``: counted as refused; the front-end ends the call with INVALID_ARGUMENT), or reading
    failed (``error``)."""

    index: int = 0
    malformed: bool = False
    error: ServingError | None = None


@dataclass(eq=False)
class _StreamItem:
    """One request of a stream on its way: queued in a batcher (``future``) or already failed.

    Only what the answer echoes is kept of the request (its tensors live on in ``core``). ``held`` is what
    it is charged against the memory budget; ``version`` is set once the request resolved (its statistics
    then expect exactly one outcome: ``recorded`` says it was given).
    """

    request_id: str
    model_name: str
    model_version: str
    started: int
    held: int = 0
    version: ServedVersion | None = None
    core: InferenceRequest | None = None
    future: Any = None
    error: ServingError | None = None
    recorded: bool = False


def check_version_string(version: str) -> None:
    """Refuse a version string that is not a version number (InvalidRequestError).

    '' means the latest ready version; otherwise ASCII decimal digits of an int64. Triton parses the
    string with C++'s ``std::stol`` and refuses what it cannot read or reads as negative ('-1', 'abc');
    ``stol`` reads a leading number, so Triton serves ' 1', '+1', '1.0' or '1x' as version 1. tensorwire
    refuses those too (a typo never selects a version), and its message says which of the two Triton does.
    """
    if not version or (version.isascii() and version.isdigit() and int(version) <= _MAX_VERSION):
        return
    shown = version if len(version) <= 40 else version[:40] + "..."
    triton = triton_version(version)
    what_triton_does = "Triton refuses it too" if triton is None else f"Triton would read it as {triton}"
    raise InvalidRequestError(
        f"model version {shown!r} is not a version number: versions are integers > 0 written with digits "
        f"only (or '' for the latest ready version); {what_triton_does}"
    )


def triton_version(version: str) -> int | None:
    """The version Triton's server reads from ``version`` (C++ ``std::stol``: leading white space, an
    optional sign, then the longest run of decimal digits), or None where Triton refuses it (no digits, a
    negative number, or one outside int64)."""
    text = version.lstrip(" \t\n\v\f\r")
    sign = -1 if text[:1] == "-" else 1
    if text[:1] in "+-" and text:
        text = text[1:]
    digits = ""
    for char in text:
        if not ("0" <= char <= "9"):
            break
        digits += char
    if not digits:
        return None
    value = sign * int(digits)
    if value < 0 or value > _MAX_VERSION:
        return None
    return value


def internal_error(model: str, err: Exception) -> ServingError:
    """An unexpected exception: log the traceback, tell the caller only that it happened and where."""
    log.error("event=internal_error model=%s error=%r", model, err, exc_info=err)
    return ServingError(f"internal error while serving model {model!r} ({type(err).__name__}); see the server log")


def _parameter_value(name: str, value: Any) -> Any:
    if value is UNSET or not isinstance(value, _PARAMETER_TYPES):
        raise InvalidRequestError(f"parameter {name!r} has no value set (unknown parameter type)")
    return value


def _int_parameter(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"parameter {name!r} must be a non-negative int64 or uint64, got {value!r}")
    return value


def _check_utf8(name: str, array: np.ndarray) -> None:
    for index, element in enumerate(array.flat):
        try:
            element.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(
                f"input {name!r} element {index} is not UTF-8; this model's string tensors hold text"
            ) from None


def _request_parameters(version: ServedVersion, parameters: Mapping[str, Any]) -> tuple[int, int | None]:
    """The request's (priority, timeout_us); other parameters of a known type are ignored."""
    settings = version.config.dynamic_batching
    priority, timeout_us = 0, None
    for name, value in parameters.items():
        value = _parameter_value(name, value)
        if name == "priority":
            priority = _int_parameter(name, value)
            if priority > settings.priority_levels:
                raise InvalidRequestError(
                    f"priority {priority} is beyond the model's priority_levels {settings.priority_levels} "
                    "(1 is highest, 0 the model's default level); Triton would run it at the default level "
                    "silently: send 0 for that"
                )
        elif name == "timeout":
            timeout_us = _int_parameter(name, value)
        elif name in _SEQUENCE_PARAMETERS and value:
            raise InvalidRequestError(f"parameter {name!r}: sequence batching is not supported by tensorwire")
    return priority, timeout_us


def prepare(version: ServedVersion, request: InferRequest, time_remaining: float | None) -> InferenceRequest:
    """Validate and decode a neutral request into a core request for ``version`` (zero-copy for raw bytes).

    One pass over the inputs; each is checked against the signature (name, datatype, shape, batch size)
    before its bytes are decoded. ``time_remaining``: seconds left before the transport's deadline (None:
    none). Raises InvalidRequestError (anything wrong with the request) or DeadlineExceededError (the
    deadline had passed on arrival). This runs for every request on the event loop, so it is kept lean.
    """
    if request.wire_error is not None:
        raise request.wire_error
    sig = version.signature
    priority, timeout_us = _request_parameters(version, request.parameters) if request.parameters else (0, None)
    arrays: dict[str, np.ndarray] = {}
    rows_by_input: dict[str, int] = {}
    key = []
    utf8 = version.utf8_inputs
    for name, datatype, shape, data, decode, parameters in request.inputs:
        if name in arrays:
            raise InvalidRequestError(f"input {name!r} appears twice")
        check_input(sig, name, datatype, shape)
        if parameters:
            for pname, value in parameters.items():
                _parameter_value(f"{name}.{pname}", value)
        try:
            array = decode(data, datatype, shape)
        except CodecError as err:
            raise InvalidRequestError(f"input {name!r}: {err}") from None
        if utf8 and name in utf8:
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
        for name in request.outputs:
            if name not in sig.output_names:
                raise InvalidRequestError(f"unknown output {name!r}; the model's outputs are {sig.output_names}")
            if name in outputs:
                raise InvalidRequestError(
                    f"output {name!r} is requested twice; name each output once (Triton refuses this too)"
                )
            outputs.append(name)
    deadline = None
    default_timeout_us = version.config.dynamic_batching.default_timeout_us
    if time_remaining is not None or timeout_us or default_timeout_us:
        limits = [time_remaining] if time_remaining is not None else []
        if timeout_us or (default_timeout_us and timeout_us is None):
            limits.append((timeout_us or default_timeout_us) / 1e6)
        remaining = min(limits)
        if remaining <= 0:
            raise DeadlineExceededError("the request's deadline had already passed when it arrived")
        deadline = asyncio.get_running_loop().time() + remaining
    return InferenceRequest(
        arrays, rows, outputs, request.id, version.batcher.priority_index(priority), deadline, tuple(key)
    )


class DataPlane:
    """The request rules over ``engine``, shared by the front-ends of one server (see the module docstring).

    ``budget`` bounds the bytes held by inference calls in flight; ``on_repository_change`` runs after every
    load or unload (the server refreshes its health statuses). ``started`` is set once the start-up load is
    done, ``draining`` when the shutdown begins.
    """

    def __init__(
        self,
        engine: Engine,
        budget: InflightBudget,
        on_repository_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.budget = budget
        self.started = False
        self.draining = False
        self._on_repository_change = on_repository_change

    # ------------------------------------------------------------ health

    def live(self) -> bool:
        """Liveness: true whenever this process answers, while models load and while it drains too (a
        liveness probe must never restart a server that is busy loading or shutting down cleanly)."""
        return True

    def ready(self) -> bool:
        """Readiness: the start-up load is done, the server is not draining, and the models are ready
        (strict readiness, the default: every configured version READY with a live replica)."""
        return self.started and not self.draining and self.engine.models_ready()

    def model_ready(self, name: str, version: str = "") -> bool:
        """Whether ``name`` (``version``; '' the latest) can serve now. False for anything that cannot,
        unknown models and versions included (Triton's answer, which wait-until-ready loops rely on);
        raises InvalidRequestError for a version that is not a number."""
        check_version_string(version)
        try:
            self.engine.resolve(name, version)
        except (ModelUnavailableError, ModelNotFoundError):
            return False
        return self.started and not self.draining

    # ---------------------------------------------------------- metadata

    def server_metadata(self) -> tuple[str, str, list[str]]:
        """(name, version, extensions) of this server, as ServerMetadata reports them."""
        return "tensorwire", __version__, list(EXTENSIONS)

    def resolve(self, method: str, name: str, version: str = "") -> ServedVersion:
        """The version serving a call of ``method``; a refusal (bad version string, unknown or not ready)
        is counted under ``method`` and raised (InvalidRequestError, ModelNotFoundError,
        ModelUnavailableError)."""
        try:
            if version:
                check_version_string(version)
            return self.engine.resolve(name, version)
        except ServingError as err:
            self.engine.refuse(method, failure_reason(err))
            raise

    def model_metadata(self, name: str, version: str = "", method: str = "ModelMetadata") -> ModelMetadata:
        """ModelMetadata of ``name``: shapes with -1 first for batched models, the READY versions."""
        served = self.resolve(method, name, version)
        sig = served.signature
        return ModelMetadata(
            name=served.name,
            versions=[str(v) for v in self.engine.ready_versions(served.name)],
            platform=served.config.platform,
            inputs=[TensorMetadata(t.name, t.datatype, sig.served_shape(t)) for t in sig.inputs],
            outputs=[TensorMetadata(t.name, t.datatype, sig.served_shape(t)) for t in sig.outputs],
        )

    def model_config(self, name: str, version: str = "", method: str = "ModelConfig") -> pb.ModelConfig:
        """Triton's ModelConfig message of the version serving ``name``."""
        return model_config_proto(self.resolve(method, name, version))

    async def statistics(
        self, name: str = "", version: str = "", method: str = "ModelStatistics"
    ) -> list[pb.ModelStatistics]:
        """Triton's ModelStatistics: every served version ('' name), a model's served versions, or one.

        A name or version that does not resolve is refused as ``resolve`` refuses it (counted)."""
        if not name:
            return await self.engine.statistics()
        if version:
            served = self.resolve(method, name, version)
            return await self.engine.statistics(served.name, served.version)
        self.resolve(method, name)
        return await self.engine.statistics(name)

    # -------------------------------------------------------- repository

    async def repository_index(self, ready_only: bool = False) -> list[IndexRow]:
        """Every model of the repository and every version record, with its state and reason."""
        return [
            IndexRow(name, version, state, reason)
            for name, version, state, reason in await self.engine.repository_index()
            if not ready_only or state == "READY"
        ]

    async def load(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        """RepositoryModelLoad: (re)load ``name`` from the repository and wait for the outcome.

        Load parameters (Triton's config and file overrides) are refused with InvalidRequestError; the
        engine's errors (ModelNotFoundError, ModelLoadError, ModelUnavailableError) are raised as they are.
        """
        if parameters:
            raise InvalidRequestError(
                f"load parameters {sorted(parameters)} are not supported; edit config.toml and load again"
            )
        try:
            await self.engine.load(name)
        finally:
            self._on_repository_change()

    async def unload(self, name: str) -> None:
        """RepositoryModelUnload: stop serving ``name`` once its accepted requests finished (within the
        grace period); ModelNotFoundError for a name the server does not know."""
        try:
            await self.engine.unload(name)
        finally:
            self._on_repository_change()

    # ------------------------------------------------------ memory budget

    def refuse(self, method: str, reason: str) -> None:
        """Count a call refused before a version resolved (``reason``: a ``stats.REASONS`` key)."""
        self.engine.refuse(method, reason)

    def admit_unread(self, method: str) -> None:
        """Refuse a call before its message is read while the budget is spent (MemoryBudgetError, counted)."""
        if self.budget.spent:
            self.engine.refuse(method, "memory_budget")
            raise self.budget.refusal()

    def hold(self, method: str, size: int) -> None:
        """Charge a request's ``size`` bytes from the moment it is read; MemoryBudgetError (counted) when
        they do not fit. Give them back with ``release`` once the answer has been sent."""
        try:
            self.budget.acquire(size)
        except MemoryBudgetError:
            self.engine.refuse(method, "memory_budget")
            raise

    # ---------------------------------------------------------- inference

    async def infer(
        self,
        request: InferRequest,
        time_remaining: float | None,
        encode: Callable[[ServedVersion, str, list[EncodedTensor]], T],
        method: str = "ModelInfer",
    ) -> T:
        """Resolve, validate, queue and await one request, and encode its answer with ``encode(version,
        request_id, outputs)``; its outcome (the encoding included) is counted exactly once.

        Raises ServingError subclasses (the front-end maps ``err.status``); an unexpected exception, ours or
        the encoder's, is logged with its traceback and raised as an INTERNAL ServingError. A cancelled wait
        withdraws the request from its batcher (``ServedVersion.infer``) and is counted ``cancelled``.
        """
        started = time.perf_counter_ns()
        request_id = request.id
        version = self.resolve(method, request.model_name, request.model_version)
        stats = version.stats
        stats.begin()
        counted = False  # True once the engine counts this request's outcome itself (see ServedVersion)
        try:
            core = prepare(version, request, time_remaining)
            request.inputs = ()  # decoded: the core request holds the tensors now
            counted = version.counts_outcomes
            outputs = await version.infer(core)
            answer = encode(version, request_id, outputs)
        except asyncio.CancelledError:
            if not counted:
                stats.record_failure(time.perf_counter_ns() - started, "cancelled")
            raise
        except ServingError as err:
            if not counted:
                stats.record_failure(time.perf_counter_ns() - started, failure_reason(err))
            raise
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            if not counted:
                stats.record_failure(time.perf_counter_ns() - started, "internal")
            raise internal_error(request.model_name, err) from None
        if not counted:
            stats.record_success(time.perf_counter_ns() - started)
        return answer

    async def stream(self, transport: StreamTransport, method: str = "ModelStreamInfer") -> StreamEnd:
        """Serve one stream: each request is queued for batching as soon as it is read (with the call's
        deadline), answers go back in request order, each echoing its request's id, and a failed request is
        answered in-band while the stream goes on. Returns how the stream ended (a malformed message is
        counted as refused here; the front-end ends the call). When the stream ends for any reason,
        requests still queued are withdrawn: nothing runs for a caller that is gone."""
        pending: asyncio.Queue[_StreamItem | StreamEnd] = asyncio.Queue(maxsize=STREAM_WINDOW)

        async def read() -> None:
            index = 0
            try:
                while True:
                    try:
                        message = await transport.read()
                    except MalformedMessage:
                        await pending.put(StreamEnd(index + 1, malformed=True))
                        return
                    if message is None:
                        await pending.put(StreamEnd(index))
                        return
                    index += 1
                    request, size = message
                    item = self._stream_submit(method, request, size, transport.time_remaining())
                    try:
                        await pending.put(item)
                    except asyncio.CancelledError:
                        self._stream_withdraw(item)
                        raise
            except Exception as err:  # noqa: BLE001 - the stream must end with a status, never hang
                await pending.put(StreamEnd(index, error=internal_error("(stream)", err)))

        reader = asyncio.ensure_future(read())
        current: _StreamItem | StreamEnd | None = None
        try:
            while True:
                current = await pending.get()
                if isinstance(current, StreamEnd):
                    break
                await transport.write(await self._stream_answer(current, transport))
                self.budget.release(current.held)
                current.held = 0
                current = None
            end, current = current, None
            if end.malformed:
                self.engine.refuse(method, "malformed")
            return end
        finally:
            reader.cancel()
            leftovers = [current] if current is not None else []
            while not pending.empty():
                leftovers.append(pending.get_nowait())
            for item in leftovers:
                if isinstance(item, _StreamItem):
                    self._stream_withdraw(item)

    def _stream_submit(
        self, method: str, request: InferRequest, size: int, time_remaining: float | None
    ) -> _StreamItem:
        """Charge, resolve, validate and queue one stream request without waiting for it (no task per
        message); failures are kept on the item and answered in order."""
        item = _StreamItem(request.id, request.model_name, request.model_version, time.perf_counter_ns())
        try:
            self.hold(method, size)
        except MemoryBudgetError as err:
            item.error = err
            return item
        item.held = size
        try:
            item.version = self.resolve(method, request.model_name, request.model_version)
        except ServingError as err:
            item.error = err
            return item
        item.version.stats.begin()
        try:
            item.core = prepare(item.version, request, time_remaining)
            request.inputs = ()
            item.future = item.version.batcher.submit(item.core)
        except ServingError as err:
            item.error, item.core = err, None
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            item.error, item.core = internal_error(request.model_name, err), None
        return item

    async def _stream_answer(self, item: _StreamItem, transport: StreamTransport) -> bytes:
        """The serialized answer to one stream item (its outputs or its error, with the request's id)."""
        version = item.version
        if item.error is None:
            assert version is not None
            try:
                outputs = await item.future
            except ServingError as err:
                item.error = err
            else:
                item.core = None
                try:
                    answer = transport.encode_answer(version, item.request_id, outputs)
                except Exception as err:  # noqa: BLE001 - a bug of ours
                    item.error = internal_error(item.model_name, err)
                else:
                    self._stream_outcome(item, None)
                    self.budget.charge(len(answer))
                    item.held += len(answer)
                    return answer
            item.core = None
        err = item.error
        self._stream_outcome(item, err)
        return transport.encode_error(item.model_name, item.model_version, item.request_id, err)

    def _stream_outcome(self, item: _StreamItem, err: ServingError | None, reason: str | None = None) -> None:
        """Count how a resolved stream item ended (once; not at all when its engine counted it)."""
        if item.version is None or item.recorded:
            return
        item.recorded = True
        if item.future is not None and item.version.counts_outcomes:
            return
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
