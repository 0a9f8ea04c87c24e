"""The blocking client: ``InferenceClient`` and its pipelined stream, ``InferStream``."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any

import grpc
from google.protobuf.message import Message

from tensorwire.client._base import ClientBase
from tensorwire.client._convert import Inputs, Outputs, ParamValue, build_request, parse_response
from tensorwire.client.errors import (
    InferenceServerError,
    RequestCancelledError,
    UnavailableError,
    from_rpc_error,
    from_stream_message,
)
from tensorwire.client.results import InferResult
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

log = logging.getLogger("tensorwire.client")

_CLOSE = object()


class InferenceClient(ClientBase):
    """A blocking client for a tensorwire (or any Open Inference Protocol v2) server.

    >>> with InferenceClient("127.0.0.1:8001") as client:
    ...     result = client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})
    ...     result["OUTPUT0"]

    Thread-safe: one client (one channel, one HTTP/2 connection per server) serves
    any number of threads; creating a client per request wastes connections. See
    :class:`~tensorwire.client._base.ClientBase` for the constructor's arguments.
    Every method raises :class:`~tensorwire.client.InferenceServerError` subclasses.
    """

    def _setup(self) -> None:
        self._channel: grpc.Channel = self._spec.open_sync()
        self._stubs: dict[str, grpc.UnaryUnaryMultiCallable] = {
            name: self._channel.unary_unary(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            for name, method in METHODS.items()
            if not method.client_streaming and not method.server_streaming
        }
        stream = METHODS["ModelStreamInfer"]
        self._stream_stub = self._channel.stream_stream(
            stream.path,
            request_serializer=stream.request.SerializeToString,
            response_deserializer=stream.response.FromString,
        )
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"InferenceClient({self.target!r})"

    # ----------------------------------------------------------- the engine

    def _unary(self, method: str, request: Message, timeout: float | None) -> Any:
        """One unary call with the client's metadata, deadline and retry policy."""
        if self._closed:
            raise RequestCancelledError("the client is closed")
        stub = self._stubs[method]
        retrier = self._retrier
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else retrier.clock() + timeout
        metadata = self._spec.metadata
        retrier.budget.record_request()
        attempt = 1
        while True:
            try:
                return stub(request, timeout=retrier.remaining(deadline), metadata=metadata)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
                trailing = error.trailing_metadata() or ()
                delay = retrier.next_delay(code, details, trailing, attempt, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            except ValueError:  # grpc: "Cannot invoke RPC on closed channel!" (closed by another thread)
                if self._closed:
                    raise RequestCancelledError("the client is closed") from None
                raise
            log.debug("%s failed (%s: %s); retry %d in %.3fs", method, code, details, attempt, delay)
            time.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------ inference

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        outputs: Outputs | None = None,
        version: int | str | None = None,
        timeout: float | None = None,
        priority: int | None = None,
        request_id: str | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> InferResult:
        """Run one inference: ``{input name: array}`` in, ``{output name: array}`` out.

        Args:
            model: the model's name; ``version`` picks a version (default: the server's).
            inputs: name -> ``np.ndarray`` (datatype from the dtype; ``object``/``str``/
                ``bytes`` arrays are BYTES) or :class:`Tensor` for an explicit datatype.
            outputs: output names to return (default: all), or name -> output parameters.
            timeout: deadline in seconds for the whole call, retries included.
            priority: queue priority level (1 is the highest) for models that have levels.
            request_id: echoed back in ``InferResult.id``.
            parameters: extra request parameters (bool/int/float/str).
        """
        request = build_request(
            model, inputs, outputs=outputs, version=version, priority=priority,
            request_id=request_id, parameters=parameters,
        )
        return parse_response(self._unary("ModelInfer", request, timeout), self._bf16_as)

    def stream(
        self,
        model: str,
        *,
        version: int | str | None = None,
        outputs: Outputs | None = None,
        timeout: float | None = None,
        max_in_flight: int = 128,
    ) -> InferStream:
        """Open a pipelined ``ModelStreamInfer`` stream for ``model`` (use it with ``with``).

        ``timeout`` bounds the whole stream (default: none, not the client's unary
        default). At most ``max_in_flight`` requests await their responses at once;
        ``submit`` blocks beyond that. Streams are not retried.
        """
        if self._closed:
            raise RequestCancelledError("the client is closed")
        return InferStream(self, model, version=version, outputs=outputs, timeout=timeout,
                           max_in_flight=max_in_flight)

    # --------------------------------------------------- health and metadata

    def server_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process is up (it may still be loading models)."""
        return self._unary("ServerLive", pb.ServerLiveRequest(), timeout).live

    def server_ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready for inference (models loaded, not draining)."""
        return self._unary("ServerReady", pb.ServerReadyRequest(), timeout).ready

    def model_ready(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> bool:
        """Whether a model (version) is ready; an unknown model raises ModelNotFoundError."""
        return self._unary("ModelReady", self._model_ready_request(model, version), timeout).ready

    def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """Server name, version and protocol extensions."""
        return self._unary("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    def model_metadata(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        """A model's versions, platform and input/output tensors (shape -1 = variable)."""
        return self._unary("ModelMetadata", self._model_metadata_request(model, version), timeout)

    def model_config(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfig:
        """A model's configuration (Triton's ModelConfig subset: batching, instances, ...)."""
        return self._unary("ModelConfig", self._model_config_request(model, version), timeout).config

    def model_statistics(
        self, model: str | None = None, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Per-model-version counters and durations (all models when ``model`` is None)."""
        return self._unary("ModelStatistics", self._statistics_request(model, version), timeout)

    # ------------------------------------------------------------ repository

    def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its state (only ready ones with ``ready=True``)."""
        request = pb.RepositoryIndexRequest(ready=ready)
        return list(self._unary("RepositoryIndex", request, timeout).models)

    def load_model(
        self,
        model: str,
        *,
        parameters: Mapping[str, bool | int | str | bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) a model from the server's repository; returns once it is loaded."""
        self._unary("RepositoryModelLoad", self._load_request(model, parameters), timeout)

    def unload_model(
        self,
        model: str,
        *,
        parameters: Mapping[str, bool | int | str | bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Unload a model; requests already accepted still finish."""
        self._unary("RepositoryModelUnload", self._unload_request(model, parameters), timeout)

    def wait_until_ready(
        self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1
    ) -> None:
        """Block until the server (and ``model``, if given) is ready; UnavailableError after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if self.server_ready(timeout=max(interval, 1.0)) and (
                    model is None or self.model_ready(model, timeout=max(interval, 1.0))
                ):
                    return
            except InferenceServerError as error:
                last = error
            if time.monotonic() + interval > deadline:
                what = f"model {model!r}" if model else "server"
                why = last or "not ready"
                raise UnavailableError(f"{what} at {self.target} not ready after {timeout}s ({why})")
            time.sleep(interval)


class InferStream:
    """A pipelined ``ModelStreamInfer`` call: many requests on one HTTP/2 stream, answers in order.

    ``map(inputs)`` sends from an iterable and yields one ``concurrent.futures.Future``
    per request, in order, each already done; ``submit(inputs)`` sends one request
    and returns its future at once. A request the server rejects fails only its own
    future (``.result()`` raises the mapped exception); the stream stays open. If the
    stream itself fails (connection lost, deadline, auth), every pending future fails
    with that error and later sends raise it.

    Why two paths: gRPC's blocking streams already run a thread that feeds requests
    and one that polls the connection; ``map`` reads the answers in the caller's own
    thread, which saves a thread hand-off per request (a third of the client's CPU
    per message). ``submit`` needs someone to read while the caller does other
    things, so its first use starts a reader thread; from then on ``map`` waits on
    that thread too. ``close`` (or leaving the ``with`` block) half-closes the stream,
    collects the outstanding answers and ends it.
    """

    def __init__(
        self,
        client: InferenceClient,
        model: str,
        *,
        version: int | str | None,
        outputs: Outputs | None,
        timeout: float | None,
        max_in_flight: int,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.model = model
        self._version = version
        self._outputs = outputs
        self._bf16_as = client._bf16_as
        self._max_in_flight = max_in_flight
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pending: collections.deque[Future[InferResult]] = collections.deque()
        self._state = threading.Condition()  # guards the fields below; notified when answers arrive
        self._read_lock = threading.Lock()  # held by whoever is reading the next answer
        self._error: InferenceServerError | None = None
        self._closing = False
        self._finished = False
        self._reader: threading.Thread | None = None
        self._call = client._stream_stub(
            self._request_iterator(), timeout=timeout, metadata=client._spec.metadata
        )

    # ------------------------------------------------------------ plumbing

    def _request_iterator(self) -> Iterator[pb.ModelInferRequest]:
        # gRPC consumes this in its own thread; _CLOSE half-closes the stream.
        get = self._requests.get
        while True:
            item = get()
            if item is _CLOSE:
                return
            yield item

    def _request(
        self, inputs: Inputs, request_id: str | None, priority: int | None,
        parameters: Mapping[str, ParamValue] | None,
    ) -> pb.ModelInferRequest:
        return build_request(
            self.model, inputs, outputs=self._outputs, version=self._version, priority=priority,
            request_id=request_id, parameters=parameters,
        )

    def _enqueue(self, request: pb.ModelInferRequest, future: Future[InferResult]) -> None:
        """Queue a request for sending (caller holds ``_state``); refuse on a closed stream."""
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RequestCancelledError("the stream is closed")
        self._pending.append(future)
        self._requests.put(request)

    def _read_one(self) -> None:
        """Read the next answer and settle the oldest pending future (caller holds ``_read_lock``)."""
        if self._finished:
            return
        try:
            response = next(self._call)
        except StopIteration:
            self._finish(RequestCancelledError("the stream ended before answering this request"))
            return
        except grpc.RpcError as error:
            self._finish(from_rpc_error(error))
            return
        with self._state:
            future = self._pending.popleft() if self._pending else None
            self._state.notify_all()
        if future is None:
            log.warning("stream for %r: a response arrived for no request; ignored", self.model)
            return
        try:
            if response.error_message:
                future.set_exception(from_stream_message(response.error_message))
            else:
                try:
                    result = parse_response(response.infer_response, self._bf16_as)
                except InferenceServerError as error:
                    future.set_exception(error)
                else:
                    future.set_result(result)
        except InvalidStateError:  # the caller cancelled this future; the answer is dropped
            pass

    def _finish(self, failure: InferenceServerError) -> None:
        """The stream is over: fail whatever is still pending with ``failure``."""
        with self._state:
            self._finished = True
            self._error = self._error or failure
            leftovers = list(self._pending)
            self._pending.clear()
            self._state.notify_all()
        for future in leftovers:
            if not future.done():
                try:
                    future.set_exception(failure)
                except InvalidStateError:
                    pass

    def _read_loop(self) -> None:
        while not self._finished:
            with self._read_lock:
                self._read_one()

    def _wait(self, future: Future[InferResult]) -> None:
        """Until ``future`` is done: read answers here, or wait for the reader thread if there is one."""
        while not future.done():
            if self._reader is not None or self._finished:
                future.exception()
                return
            with self._read_lock:
                if not future.done():
                    self._read_one()

    # ---------------------------------------------------------------- API

    def submit(
        self,
        inputs: Inputs,
        *,
        request_id: str | None = None,
        priority: int | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> Future[InferResult]:
        """Send one request; its future resolves to an InferResult or raises its own error.

        Blocks while ``max_in_flight`` requests await answers. Inputs the client
        cannot encode raise InvalidInputError here (nothing is sent).
        """
        request = self._request(inputs, request_id, priority, parameters)
        future: Future[InferResult] = Future()
        with self._state:
            if self._reader is None and not self._finished:
                self._reader = threading.Thread(
                    target=self._read_loop, name=f"tensorwire-stream-{self.model}", daemon=True
                )
                self._reader.start()
            while len(self._pending) >= self._max_in_flight and not (self._error or self._closing):
                self._state.wait()
            self._enqueue(request, future)
        return future

    def map(self, inputs: Iterable[Inputs]) -> Iterator[Future[InferResult]]:
        """Send every item of ``inputs`` and yield their futures in order, each once done.

        Requests keep flowing while earlier answers are consumed (up to the stream's
        ``max_in_flight``). Call ``.result()`` on each: it returns the result or raises
        that request's own error without ending the iteration.
        """
        waiting: collections.deque[Future[InferResult]] = collections.deque()
        for item in inputs:
            request = self._request(item, None, None, None)
            future: Future[InferResult] = Future()
            while True:
                with self._state:
                    if len(self._pending) < self._max_in_flight or self._error or self._closing:
                        self._enqueue(request, future)
                        break
                    oldest = self._pending[0]
                self._wait(oldest)  # make room by collecting the oldest answer
            waiting.append(future)
            while waiting and waiting[0].done():
                yield waiting.popleft()
        while waiting:
            future = waiting.popleft()
            self._wait(future)
            yield future

    def close(self, timeout: float | None = None) -> None:
        """Half-close: no more requests; collect the outstanding answers, then end."""
        with self._state:
            first, self._closing = not self._closing, True
        if first:
            self._requests.put(_CLOSE)
        self._drain(timeout)

    def cancel(self) -> None:
        """Abort the stream at once; pending futures fail with RequestCancelledError."""
        with self._state:
            first, self._closing = not self._closing, True
        self._call.cancel()
        if first:
            self._requests.put(_CLOSE)
        self._drain(None)

    def _drain(self, timeout: float | None) -> None:
        if self._reader is not None:
            self._reader.join(timeout)
            return
        with self._read_lock:
            while not self._finished:
                self._read_one()

    def __enter__(self) -> InferStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.cancel()

    def __iter__(self) -> Iterator[Future[InferResult]]:
        raise TypeError("iterate over stream.map(inputs), not the stream itself")
