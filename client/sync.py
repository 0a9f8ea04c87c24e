"""The blocking client: ``InferenceClient`` and its pipelined stream, ``InferStream``.

Each method hands a plan from the client core (:mod:`tensorwire.client._core`) to
``_drive``, which makes the calls and sleeps between retries; everything else (requests,
casting, deadlines, retries, errors, decoding) is the core's.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from tensorwire.client._channel import stream_stub, unary_stubs
from tensorwire.client._convert import Inputs, Outputs, ParamValue, RepositoryParams
from tensorwire.client._core import Attempt, ClientBase, Plan, Sleep
from tensorwire.client._pairing import StreamBase, fail
from tensorwire.client.errors import InferenceServerError, RequestCancelledError, from_rpc_error
from tensorwire.client.results import InferResult
from tensorwire.proto import inference_pb2 as pb

T = TypeVar("T")
_CLOSE = object()


class InferenceClient(ClientBase):
    """A blocking client for a tensorwire (or any Open Inference Protocol v2) server.

    >>> with InferenceClient("127.0.0.1:8001") as client:
    ...     result = client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})
    ...     result["OUTPUT0"]

    Thread-safe: one client (one channel, one HTTP/2 connection per server) serves
    any number of threads; creating a client per request wastes connections. See
    :class:`~tensorwire.client._core.ClientBase` for the constructor's arguments.

    Every method raises :class:`~tensorwire.client.InferenceServerError` subclasses, mapped
    from the gRPC status: ModelNotFoundError (NOT_FOUND), InvalidInputError (INVALID_ARGUMENT,
    also raised before sending for inputs the client refuses), ServerBusyError (queue full),
    DeadlineExceededError, UnavailableError (no connection; model loading; server draining),
    UnauthenticatedError, RequestCancelledError (also: the client is closed), InternalServerError.
    ``timeout`` arguments are seconds for the whole call, retries included; ``None`` takes the
    client's default (itself ``None``: no deadline).
    """

    def _setup(self) -> None:
        self._channel: grpc.Channel = self._spec.open_sync()
        self._stubs: dict[str, grpc.UnaryUnaryMultiCallable] = unary_stubs(self._channel)
        self._stream_stub: grpc.StreamStreamMultiCallable = stream_stub(self._channel)
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

    # ----------------------------------------------------------- the driver

    def _drive(self, plan: Plan[T]) -> T:
        """Run a plan of the client core: make its calls, sleep its back-offs, return its value."""
        try:
            effect = next(plan)
            while True:
                if type(effect) is Sleep:
                    time.sleep(effect.delay_s)
                    effect = plan.send(None)
                else:
                    effect = plan.send(self._attempt(effect))
        except StopIteration as done:
            return done.value

    def _attempt(self, attempt: Attempt) -> Any:
        """One call: the response message, or the grpc.RpcError it failed with (returned, not raised)."""
        if self._closed:
            raise RequestCancelledError("the client is closed")
        stub = self._stubs[attempt.method]
        try:
            return stub(attempt.request, timeout=attempt.timeout_s, metadata=self._spec.metadata)
        except grpc.RpcError as error:
            return error
        except ValueError:  # grpc: "Cannot invoke RPC on closed channel!" (closed by another thread)
            if self._closed:
                raise RequestCancelledError("the client is closed") from None
            raise

    # ------------------------------------------------------------ inference

    def infer(
        self,
        model: str,
        inputs: Inputs | Any,
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
            model: the model's name.
            inputs: input name -> value, or one bare value for a model with a single input.
                A value is an ``np.ndarray`` (shape with the batch dimension first when the
                model batches, e.g. ``[1, 16]`` for a ``[-1, 16]`` input), a Python number or
                (nested) list, or a :class:`~tensorwire.client.Tensor` naming its datatype
                explicitly. Values are fitted to the datatypes the model declares by one
                rule, never lossy without asking (README, "Sending inputs"): float64 zeros
                become FP32, 0.1 stays 0.1, a value that would change raises InvalidInputError.
                ``str``/``bytes``/``object`` arrays are BYTES.
            outputs: output names to return (default: all), or name -> output parameters.
            version: the model version (default: the server's choice, the newest ready one).
            timeout: deadline in seconds for the whole call (metadata look-up and retries included).
            priority: queue priority level (1 is the highest) for models that have levels; 0 or
                None: the model's default.
            request_id: an id the server logs and echoes back in ``InferResult.id``.
            parameters: extra request parameters (bool/int/float/str values).

        Returns:
            An :class:`~tensorwire.client.InferResult`: output name -> read-only ``np.ndarray``
            (shapes as the model answered, batch dimension included), plus ``model_version``
            and ``id``.

        Raises:
            InvalidInputError: an input the client refuses (before anything is sent: unknown
                datatype, a value the casting rule would change, a bare value for a model with
                several inputs) or the server refuses (wrong name, shape, datatype).
            ModelNotFoundError: no such model or version.
            InferenceServerError: any other failure, as a subclass named after its status.
        """
        plan = self._plan_infer(model, inputs, outputs, version, timeout, priority, request_id, parameters)
        return self._drive(plan)

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

        Args:
            model: the model every request of the stream goes to; ``version`` as in :meth:`infer`.
            outputs: output names every request asks for (default: all).
            timeout: deadline in seconds for the whole stream (default: none; the client's
                unary default does not apply to streams).
            max_in_flight: how many requests may await their answers at once; ``submit``
                blocks beyond that.

        Returns:
            An :class:`InferStream`, already connected. Streams are never retried.

        Raises:
            RequestCancelledError: the client is closed.
            ValueError: ``max_in_flight`` < 1.
        """
        if self._closed:
            raise RequestCancelledError("the client is closed")
        return InferStream(self, model, version=version, outputs=outputs, timeout=timeout, max_in_flight=max_in_flight)

    # --------------------------------------------------- health and metadata

    def server_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process is up (it may still be loading models).

        Raises UnavailableError when no server answers (after the retries the policy allows).
        """
        return self._drive(self._plan_server_live(timeout))

    def server_ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready for inference (its models loaded, not draining).

        Raises UnavailableError when no server answers.
        """
        return self._drive(self._plan_server_ready(timeout))

    def model_ready(self, model: str, version: int | str | None = None, *, timeout: float | None = None) -> bool:
        """Whether a model (a version of it, if given; else its default) is ready for inference.

        Raises ModelNotFoundError when the server does not know the model.
        """
        return self._drive(self._plan_model_ready(model, version, timeout))

    def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions (``statistics``, ...), as the protobuf message."""
        return self._drive(self._plan_server_metadata(timeout))

    def model_metadata(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        """A model's ready versions, platform and input/output tensors, as the protobuf message.

        Tensor shapes include the batch dimension as -1 for models that batch; -1 elsewhere
        marks a variable dimension. Raises ModelNotFoundError for an unknown model or version.
        """
        return self._drive(self._plan_model_metadata(model, version, timeout))

    def model_config(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfig:
        """A model's configuration: Triton's ``ModelConfig`` subset, as the protobuf message.

        Fields: name, platform, backend, max_batch_size, input and output (dims *without* the
        batch dimension), dynamic_batching, instance_group, version_policy. Raises
        ModelNotFoundError for an unknown model or version.
        """
        return self._drive(self._plan_model_config(model, version, timeout))

    def model_statistics(
        self, model: str | None = None, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Triton's ModelStatistics per model version: counts, and durations in nanoseconds.

        ``model=None`` returns every served model. Raises ModelNotFoundError for an unknown model.
        """
        return self._drive(self._plan_model_statistics(model, version, timeout))

    # ------------------------------------------------------------ repository

    def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its version, state and reason (only ready ones with ``ready=True``)."""
        return self._drive(self._plan_repository_index(ready, timeout))

    def load_model(
        self,
        model: str,
        *,
        parameters: RepositoryParams | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) a model from the server's repository; returns once it is loaded.

        Raises the server's error when the load fails (InvalidInputError for a bad
        configuration, ModelNotFoundError for a model the repository lacks, ...).
        """
        self._drive(self._plan_load_model(model, parameters, timeout))

    def unload_model(
        self,
        model: str,
        *,
        parameters: RepositoryParams | None = None,
        timeout: float | None = None,
    ) -> None:
        """Unload a model; requests it already accepted still finish. Raises ModelNotFoundError if unknown."""
        self._drive(self._plan_unload_model(model, parameters, timeout))

    def wait_until_ready(self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Block until the server is ready, or with ``model``, until the server is live and that model is
        ready (a server with strict readiness stays not ready while any other model is not; this waits only
        for the one you name), polling every ``interval`` seconds.

        Raises UnavailableError (with the last error seen) when ``timeout`` seconds pass first.
        """
        self._drive(self._plan_wait_until_ready(model, timeout, interval))


class InferStream(StreamBase[Future[InferResult]]):
    """A pipelined ``ModelStreamInfer`` call: many requests on one HTTP/2 stream, answers in order.

    ``map(inputs)`` sends from an iterable and yields one ``concurrent.futures.Future``
    per request, in order, each already done; ``submit(inputs)`` sends one request
    and returns its future at once. A request the server rejects fails only its own
    future (``.result()`` raises the mapped exception); the stream stays open. If the
    stream itself fails (connection lost, deadline, auth), every pending future fails
    with that error and later sends raise it. Inputs follow the same rules as
    :meth:`InferenceClient.infer` (a bare value for a single-input model, the casting rule).

    Every request carries an id (``request_id``, or a generated ``tw-<stream>-<n>``) and
    each answer goes to the future of the id the server echoes, so a request abandoned
    half way or a cancelled future never shifts answers onto other requests.

    Why two ways to read: gRPC's blocking streams already run a thread that feeds requests
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
        super().__init__(client, model, version=version, outputs=outputs, max_in_flight=max_in_flight)
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state = threading.Condition()  # guards the ledger and the flags; notified when answers arrive
        self._read_lock = threading.Lock()  # held by whoever is reading the next answer
        self._finished = False
        self._reader: threading.Thread | None = None
        self._call = client._stream_stub(self._request_iterator(), timeout=timeout, metadata=client._spec.metadata)

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
        self,
        inputs: Inputs | Any,
        request_id: str | None,
        priority: int | None,
        parameters: Mapping[str, ParamValue] | None,
    ) -> pb.ModelInferRequest | InferenceServerError:
        return self._client._drive(self._request_plan(inputs, request_id, priority, parameters))

    def _enqueue(self, request: pb.ModelInferRequest, future: Future[InferResult]) -> None:
        """Register and queue a request for sending (caller holds ``_state``); refuse on a closed stream.

        Registration and queueing happen together under the lock: a request is either
        sent and tracked, or neither.
        """
        if self._error is not None:
            raise self._error
        if self._closing:
            raise RequestCancelledError("the stream is closed")
        self._ledger.add(request, future)
        self._requests.put(request)

    def _read_one(self) -> None:
        """Read the next answer and settle the future of the id it echoes (caller holds ``_read_lock``)."""
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
            future = self._ledger.take(response)
            self._state.notify_all()
        self._settle(future, response)

    def _finish(self, failure: InferenceServerError) -> None:
        """The stream is over: fail whatever is still pending with ``failure``."""
        with self._state:
            self._finished = True
            self._error = self._error or failure
            leftovers = self._ledger.drain()
            self._state.notify_all()
        fail(leftovers, failure)

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

    @staticmethod
    def _failed(error: InferenceServerError) -> Future[InferResult]:
        future: Future[InferResult] = Future()
        future.set_exception(error)
        return future

    # ---------------------------------------------------------------- API

    def submit(
        self,
        inputs: Inputs | Any,
        *,
        request_id: str | None = None,
        priority: int | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> Future[InferResult]:
        """Send one request; its future resolves to an InferResult or raises its own error.

        Args:
            inputs: as in :meth:`InferenceClient.infer` (a mapping, or a bare value).
            request_id: the request's id, echoed in ``InferResult.id`` (default: generated).
            priority, parameters: as in :meth:`InferenceClient.infer`.

        Returns:
            A ``concurrent.futures.Future``; ``.result(timeout)`` returns the InferResult or
            raises that request's error (InferenceServerError subclasses). Cancelling it, or
            a ``.result`` that times out, affects no other request.

        Raises:
            InvalidInputError: inputs the client refuses (nothing is sent).
            InferenceServerError: the stream already failed or is closed
                (RequestCancelledError). Blocks while ``max_in_flight`` requests await answers.
        """
        request = self._request(inputs, request_id, priority, parameters)
        if isinstance(request, InferenceServerError):
            return self._failed(request)  # the model's metadata could not be had: this item fails
        future: Future[InferResult] = Future()
        with self._state:
            if self._reader is None and not self._finished:
                self._reader = threading.Thread(
                    target=self._read_loop, name=f"tensorwire-stream-{self.model}", daemon=True
                )
                self._reader.start()
            while len(self._ledger) >= self._max_in_flight and not (self._error or self._closing):
                self._state.wait()
            self._enqueue(request, future)
        return future

    def map(self, inputs: Iterable[Inputs | Any]) -> Iterator[Future[InferResult]]:
        """Send every item of ``inputs`` and yield their futures in order, each once done.

        Requests keep flowing while earlier answers are consumed (up to the stream's
        ``max_in_flight``). Call ``.result()`` on each: it returns the result or raises
        that request's own error without ending the iteration. Raises InvalidInputError
        for an item the client refuses (items before it were sent).
        """
        waiting: collections.deque[Future[InferResult]] = collections.deque()
        for item in inputs:
            request = self._request(item, None, None, None)
            if isinstance(request, InferenceServerError):
                waiting.append(self._failed(request))
                continue
            future: Future[InferResult] = Future()
            while True:
                with self._state:
                    if len(self._ledger) < self._max_in_flight or self._error or self._closing:
                        self._enqueue(request, future)
                        break
                    oldest = self._ledger.oldest()
                if oldest is not None:
                    self._wait(oldest)  # make room by collecting the oldest answer
            waiting.append(future)
            while waiting and waiting[0].done():
                yield waiting.popleft()
        while waiting:
            future = waiting.popleft()
            self._wait(future)
            yield future

    def close(self, timeout: float | None = None) -> None:
        """Half-close: no more requests; collect the outstanding answers (at most ``timeout`` seconds), then end."""
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
