"""The asyncio client: ``AsyncInferenceClient`` and ``AsyncInferStream``, the blocking client's twin."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
import grpc.aio
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


class AsyncInferenceClient(ClientBase):
    """An asyncio client with the same methods as :class:`InferenceClient`, as coroutines.

    >>> async with AsyncInferenceClient("127.0.0.1:8001") as client:
    ...     result = await client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})

    The channel is opened on first use, inside the running event loop (gRPC's asyncio
    channels belong to one loop); use one client per loop. Many concurrent calls
    (``asyncio.gather``) share its connection.
    """

    def _setup(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._stream_stub: grpc.aio.StreamStreamMultiCallable | None = None
        self._closed = False

    def _open(self) -> grpc.aio.Channel:
        if self._closed:
            raise RequestCancelledError("the client is closed")
        channel = self._spec.open_aio()
        self._stubs = {
            name: channel.unary_unary(
                method.path,
                request_serializer=method.request.SerializeToString,
                response_deserializer=method.response.FromString,
            )
            for name, method in METHODS.items()
            if not method.client_streaming and not method.server_streaming
        }
        stream = METHODS["ModelStreamInfer"]
        self._stream_stub = channel.stream_stream(
            stream.path,
            request_serializer=stream.request.SerializeToString,
            response_deserializer=stream.response.FromString,
        )
        self._channel = channel
        return channel

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled. Idempotent."""
        self._closed = True
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        if self._channel is None:
            self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncInferenceClient({self.target!r})"

    # ----------------------------------------------------------- the engine

    async def _unary(self, method: str, request: Message, timeout: float | None) -> Any:
        """One unary call with the client's metadata, deadline and retry policy."""
        if self._channel is None:
            self._open()
        stub = self._stubs[method]
        retrier = self._retrier
        timeout = self._timeout if timeout is None else timeout
        deadline = None if timeout is None else retrier.clock() + timeout
        metadata = self._spec.metadata
        retrier.budget.record_request()
        attempt = 1
        while True:
            try:
                return await stub(request, timeout=retrier.remaining(deadline), metadata=metadata)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()
                trailing = error.trailing_metadata() or ()
                delay = retrier.next_delay(code, details, tuple(trailing), attempt, deadline)
                if delay is None:
                    raise from_rpc_error(error) from None
            log.debug("%s failed (%s: %s); retry %d in %.3fs", method, code, details, attempt, delay)
            await asyncio.sleep(delay)
            attempt += 1

    # ------------------------------------------------------------ inference

    async def infer(
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
        """Run one inference; see :meth:`InferenceClient.infer`."""
        request = build_request(
            model, inputs, outputs=outputs, version=version, priority=priority,
            request_id=request_id, parameters=parameters,
        )
        return parse_response(await self._unary("ModelInfer", request, timeout), self._bf16_as)

    def stream(
        self,
        model: str,
        *,
        version: int | str | None = None,
        outputs: Outputs | None = None,
        timeout: float | None = None,
        max_in_flight: int = 128,
    ) -> AsyncInferStream:
        """A pipelined ``ModelStreamInfer`` stream; use ``async with client.stream(model) as s``."""
        return AsyncInferStream(self, model, version=version, outputs=outputs, timeout=timeout,
                                max_in_flight=max_in_flight)

    # --------------------------------------------------- health and metadata

    async def server_live(self, *, timeout: float | None = None) -> bool:
        """Whether the server process is up."""
        return (await self._unary("ServerLive", pb.ServerLiveRequest(), timeout)).live

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        """Whether the server is ready for inference."""
        return (await self._unary("ServerReady", pb.ServerReadyRequest(), timeout)).ready

    async def model_ready(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> bool:
        """Whether a model (version) is ready; an unknown model raises ModelNotFoundError."""
        return (await self._unary("ModelReady", self._model_ready_request(model, version), timeout)).ready

    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        """Server name, version and protocol extensions."""
        return await self._unary("ServerMetadata", pb.ServerMetadataRequest(), timeout)

    async def model_metadata(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        """A model's versions, platform and input/output tensors."""
        return await self._unary("ModelMetadata", self._model_metadata_request(model, version), timeout)

    async def model_config(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfig:
        """A model's configuration."""
        return (await self._unary("ModelConfig", self._model_config_request(model, version), timeout)).config

    async def model_statistics(
        self, model: str | None = None, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        """Per-model-version counters and durations (all models when ``model`` is None)."""
        return await self._unary("ModelStatistics", self._statistics_request(model, version), timeout)

    async def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        """Every model in the repository with its state."""
        response = await self._unary("RepositoryIndex", pb.RepositoryIndexRequest(ready=ready), timeout)
        return list(response.models)

    async def load_model(
        self,
        model: str,
        *,
        parameters: Mapping[str, bool | int | str | bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Load (or reload) a model from the server's repository."""
        await self._unary("RepositoryModelLoad", self._load_request(model, parameters), timeout)

    async def unload_model(
        self,
        model: str,
        *,
        parameters: Mapping[str, bool | int | str | bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Unload a model."""
        await self._unary("RepositoryModelUnload", self._unload_request(model, parameters), timeout)

    async def wait_until_ready(
        self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1
    ) -> None:
        """Wait until the server (and ``model``, if given) is ready; UnavailableError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while True:
            try:
                if await self.server_ready(timeout=max(interval, 1.0)) and (
                    model is None or await self.model_ready(model, timeout=max(interval, 1.0))
                ):
                    return
            except InferenceServerError as error:
                last = error
            if loop.time() + interval > deadline:
                what = f"model {model!r}" if model else "server"
                why = last or "not ready"
                raise UnavailableError(f"{what} at {self.target} not ready after {timeout}s ({why})")
            await asyncio.sleep(interval)


class AsyncInferStream:
    """The asyncio twin of :class:`~tensorwire.client.sync.InferStream`.

    ``await submit(inputs)`` sends a request and returns an ``asyncio.Future``;
    ``async for future in stream.map(inputs)`` yields futures in order, each done;
    ``await future`` (or ``future.result()``) raises only that request's error.
    """

    def __init__(
        self,
        client: AsyncInferenceClient,
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
        self._client = client
        self._version = version
        self._outputs = outputs
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: collections.deque[asyncio.Future[InferResult]] = collections.deque()
        self._window: asyncio.Semaphore | None = None
        self._write_lock: asyncio.Lock | None = None
        self._error: InferenceServerError | None = None
        self._closing = False

    async def _start(self) -> None:
        client = self._client
        if client._channel is None:
            client._open()
        assert client._stream_stub is not None
        self._window = asyncio.Semaphore(self._max_in_flight)
        self._write_lock = asyncio.Lock()
        self._call = client._stream_stub(timeout=self._timeout, metadata=client._spec.metadata)
        self._reader = asyncio.create_task(self._read(), name=f"tensorwire-stream-{self.model}")

    async def _read(self) -> None:
        assert self._call is not None and self._window is not None
        call, pending, window, bf16_as = self._call, self._pending, self._window, self._client._bf16_as
        failure: InferenceServerError | None = None
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                window.release()
                if not pending:
                    log.warning("stream for %r: a response arrived for no request; ignored", self.model)
                    continue
                future = pending.popleft()
                if future.done():  # the caller cancelled waiting on it
                    continue
                if response.error_message:
                    future.set_exception(from_stream_message(response.error_message))
                    continue
                try:
                    future.set_result(parse_response(response.infer_response, bf16_as))
                except InferenceServerError as error:
                    future.set_exception(error)
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
        except asyncio.CancelledError:
            failure = RequestCancelledError("the stream was cancelled")
        if failure is None:
            failure = RequestCancelledError("the stream ended before answering this request")
        self._error = self._error or failure
        while pending:
            future = pending.popleft()
            window.release()
            if not future.done():
                future.set_exception(failure)

    async def submit(
        self,
        inputs: Inputs,
        *,
        request_id: str | None = None,
        priority: int | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> asyncio.Future[InferResult]:
        """Send one request; the returned future resolves to its result or its own error."""
        if self._call is None:
            await self._start()
        assert self._call is not None and self._window is not None and self._write_lock is not None
        request = build_request(
            self.model, inputs, outputs=self._outputs, version=self._version, priority=priority,
            request_id=request_id, parameters=parameters,
        )
        await self._window.acquire()
        if self._error is not None or self._closing:
            self._window.release()
            raise self._error or RequestCancelledError("the stream is closed")
        future: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        async with self._write_lock:  # keeps the pending order equal to the write order
            self._pending.append(future)
            try:
                await self._call.write(request)
            except (grpc.RpcError, asyncio.InvalidStateError) as error:
                failure = from_rpc_error(error) if isinstance(error, grpc.RpcError) else (
                    self._error or RequestCancelledError("the stream is closed")
                )
                if not future.done():
                    future.set_exception(failure)
        return future

    async def map(
        self, inputs: Iterable[Inputs] | AsyncIterable[Inputs]
    ) -> AsyncIterator[asyncio.Future[InferResult]]:
        """Submit every item and yield the futures in order, each once done."""
        waiting: collections.deque[asyncio.Future[InferResult]] = collections.deque()
        if isinstance(inputs, AsyncIterable):
            async for item in inputs:
                waiting.append(await self.submit(item))
                while waiting and waiting[0].done():
                    yield waiting.popleft()
        else:
            for item in inputs:
                waiting.append(await self.submit(item))
                while waiting and waiting[0].done():
                    yield waiting.popleft()
        while waiting:
            future = waiting.popleft()
            await asyncio.wait((future,))
            yield future

    async def close(self) -> None:
        """Half-close: no more requests; wait for the outstanding answers, then end."""
        if self._call is None:
            self._closing = True
            return
        if not self._closing:
            self._closing = True
            assert self._write_lock is not None
            async with self._write_lock:
                try:
                    await self._call.done_writing()
                except grpc.RpcError:
                    pass
        if self._reader is not None:
            await self._reader

    async def cancel(self) -> None:
        """Abort the stream; pending futures fail with RequestCancelledError."""
        self._closing = True
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> AsyncInferStream:
        await self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.cancel()
