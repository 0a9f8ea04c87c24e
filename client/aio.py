"""The asyncio client: ``AsyncInferenceClient`` and ``AsyncInferStream``, the blocking client's twin.

Each method hands the same plan as its blocking twin (from :mod:`tensorwire.client._core`)
to an ``await``-ing driver, and shares its twin's docstring: one behaviour, documented once.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc
import grpc.aio

from tensorwire.client._channel import stream_stub, unary_stubs
from tensorwire.client._convert import Inputs, Outputs, ParamValue, RepositoryParams
from tensorwire.client._core import Attempt, ClientBase, Plan, Sleep
from tensorwire.client._pairing import StreamBase, fail
from tensorwire.client.errors import InferenceServerError, RequestCancelledError, from_rpc_error
from tensorwire.client.results import InferResult
from tensorwire.client.sync import InferenceClient
from tensorwire.proto import inference_pb2 as pb

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])
_CLOSE = object()


def _doc_of(twin: Callable[..., Any]) -> Callable[[F], F]:
    """Give a coroutine method its blocking twin's docstring (the behaviour is the same)."""

    def apply(method: F) -> F:
        method.__doc__ = twin.__doc__
        return method

    return apply


class AsyncInferenceClient(ClientBase):
    """An asyncio client with the same methods as :class:`InferenceClient`, each a coroutine.

    >>> async with AsyncInferenceClient("127.0.0.1:8001") as client:
    ...     result = await client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})

    Arguments, return values, exceptions and units are those of the blocking client (the
    docstrings are shared). The channel is opened on first use, inside the running event
    loop (gRPC's asyncio channels belong to one loop): use one client per loop. Many
    concurrent calls (``asyncio.gather``) share its connection.
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
        self._stubs = unary_stubs(channel)
        self._stream_stub = stream_stub(channel)
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

    # ----------------------------------------------------------- the driver

    async def _drive(self, plan: Plan[T]) -> T:
        """Run a plan of the client core: await its calls and back-offs, return its value."""
        try:
            effect = next(plan)
            while True:
                if type(effect) is Sleep:
                    await asyncio.sleep(effect.delay_s)
                    effect = plan.send(None)
                else:
                    effect = plan.send(await self._attempt(effect))
        except StopIteration as done:
            return done.value

    async def _attempt(self, attempt: Attempt) -> Any:
        """One call: the response message, or the grpc.RpcError it failed with (returned, not raised)."""
        if self._channel is None:
            self._open()
        try:
            return await self._stubs[attempt.method](
                attempt.request, timeout=attempt.timeout_s, metadata=self._spec.metadata
            )
        except grpc.RpcError as error:
            return error

    # ------------------------------------------------------------ inference

    @_doc_of(InferenceClient.infer)
    async def infer(
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
        plan = self._plan_infer(model, inputs, outputs, version, timeout, priority, request_id, parameters)
        return await self._drive(plan)

    @_doc_of(InferenceClient.stream)
    def stream(
        self,
        model: str,
        *,
        version: int | str | None = None,
        outputs: Outputs | None = None,
        timeout: float | None = None,
        max_in_flight: int = 128,
    ) -> AsyncInferStream:
        return AsyncInferStream(
            self, model, version=version, outputs=outputs, timeout=timeout, max_in_flight=max_in_flight
        )

    # --------------------------------------------------- health and metadata

    @_doc_of(InferenceClient.server_live)
    async def server_live(self, *, timeout: float | None = None) -> bool:
        return await self._drive(self._plan_server_live(timeout))

    @_doc_of(InferenceClient.server_ready)
    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return await self._drive(self._plan_server_ready(timeout))

    @_doc_of(InferenceClient.model_ready)
    async def model_ready(self, model: str, version: int | str | None = None, *, timeout: float | None = None) -> bool:
        return await self._drive(self._plan_model_ready(model, version, timeout))

    @_doc_of(InferenceClient.server_metadata)
    async def server_metadata(self, *, timeout: float | None = None) -> pb.ServerMetadataResponse:
        return await self._drive(self._plan_server_metadata(timeout))

    @_doc_of(InferenceClient.model_metadata)
    async def model_metadata(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelMetadataResponse:
        return await self._drive(self._plan_model_metadata(model, version, timeout))

    @_doc_of(InferenceClient.model_config)
    async def model_config(
        self, model: str, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelConfig:
        return await self._drive(self._plan_model_config(model, version, timeout))

    @_doc_of(InferenceClient.model_statistics)
    async def model_statistics(
        self, model: str | None = None, version: int | str | None = None, *, timeout: float | None = None
    ) -> pb.ModelStatisticsResponse:
        return await self._drive(self._plan_model_statistics(model, version, timeout))

    # ------------------------------------------------------------ repository

    @_doc_of(InferenceClient.repository_index)
    async def repository_index(
        self, *, ready: bool = False, timeout: float | None = None
    ) -> list[pb.RepositoryIndexResponse.ModelIndex]:
        return await self._drive(self._plan_repository_index(ready, timeout))

    @_doc_of(InferenceClient.load_model)
    async def load_model(
        self,
        model: str,
        *,
        parameters: RepositoryParams | None = None,
        timeout: float | None = None,
    ) -> None:
        await self._drive(self._plan_load_model(model, parameters, timeout))

    @_doc_of(InferenceClient.unload_model)
    async def unload_model(
        self,
        model: str,
        *,
        parameters: RepositoryParams | None = None,
        timeout: float | None = None,
    ) -> None:
        await self._drive(self._plan_unload_model(model, parameters, timeout))

    @_doc_of(InferenceClient.wait_until_ready)
    async def wait_until_ready(self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1) -> None:
        await self._drive(self._plan_wait_until_ready(model, timeout, interval))


class AsyncInferStream(StreamBase[asyncio.Future[InferResult]]):
    """The asyncio twin of :class:`~tensorwire.client.sync.InferStream`.

    ``await submit(inputs)`` registers a request and returns an ``asyncio.Future``;
    ``async for future in stream.map(inputs)`` yields futures in order, each done;
    ``await future`` (or ``future.result()``) raises only that request's error.

    A submit is either sent and tracked or neither: it may wait (for the model's metadata,
    for room under ``max_in_flight``) only *before* its request is registered, and from
    registration on it does not wait at all; one writer task sends the registered requests
    in order. So cancelling a submit (``asyncio.wait_for(stream.submit(x), 1)`` timing
    out, a task cancelled) leaves nothing behind, and answers pair with their requests by
    the id the server echoes. Cancelling or timing out the returned future affects only it.
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
        super().__init__(client, model, version=version, outputs=outputs, max_in_flight=max_in_flight)
        self._client: AsyncInferenceClient = client
        self._timeout_s = timeout
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[Any] = asyncio.Queue()
        self._window = asyncio.Semaphore(max_in_flight)

    def _start(self) -> None:
        """Open the call and start its reader and writer (no await: nothing to cancel half way)."""
        if self._call is not None:
            return
        client = self._client
        if client._channel is None:
            client._open()
        assert client._stream_stub is not None
        self._call = client._stream_stub(timeout=self._timeout_s, metadata=client._spec.metadata)
        self._writer = asyncio.create_task(self._write(self._call), name=f"tensorwire-stream-{self.model}-send")
        self._reader = asyncio.create_task(self._read(self._call), name=f"tensorwire-stream-{self.model}")

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        """Send the registered requests in order; on the close marker, half-close."""
        outbox = self._outbox
        try:
            while True:
                request = await outbox.get()
                if request is _CLOSE:
                    await call.done_writing()
                    return
                await call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError):
            return  # the call is over: the reader reports why and fails what is pending

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        ledger, window = self._ledger, self._window
        failure: InferenceServerError | None = None
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                future = ledger.take(response)
                if future is not None:
                    window.release()
                self._settle(future, response)
        except grpc.RpcError as error:
            failure = from_rpc_error(error)
        except asyncio.CancelledError:
            failure = RequestCancelledError("the stream was cancelled")
        if failure is None:
            failure = RequestCancelledError("the stream ended before answering this request")
        self._error = self._error or failure
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        leftovers = ledger.drain()
        for _ in leftovers:
            window.release()
        fail(leftovers, failure)

    async def submit(
        self,
        inputs: Inputs | Any,
        *,
        request_id: str | None = None,
        priority: int | None = None,
        parameters: Mapping[str, ParamValue] | None = None,
    ) -> asyncio.Future[InferResult]:
        """Send one request; the returned ``asyncio.Future`` resolves to its InferResult or its own error.

        Arguments and errors as in :meth:`InferStream.submit`. Waits while ``max_in_flight``
        requests await answers; cancelling the wait sends nothing.
        """
        self._start()
        request = await self._client._drive(self._request_plan(inputs, request_id, priority, parameters))
        loop = asyncio.get_running_loop()
        if isinstance(request, InferenceServerError):
            failed: asyncio.Future[InferResult] = loop.create_future()
            failed.set_exception(request)  # the model's metadata could not be had: this item fails
            return failed
        await self._window.acquire()
        # From here on nothing awaits: the request is registered and queued, or refused.
        if self._error is not None or self._closing:
            self._window.release()
            raise self._error or RequestCancelledError("the stream is closed")
        future: asyncio.Future[InferResult] = loop.create_future()
        self._ledger.add(request, future)
        self._outbox.put_nowait(request)
        return future

    async def map(
        self, inputs: Iterable[Inputs | Any] | AsyncIterable[Inputs | Any]
    ) -> AsyncIterator[asyncio.Future[InferResult]]:
        """Submit every item and yield the futures in order, each once done (see :meth:`InferStream.map`)."""
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
            self._outbox.put_nowait(_CLOSE)
        assert self._reader is not None and self._writer is not None
        await self._reader
        await asyncio.gather(self._writer, return_exceptions=True)

    async def cancel(self) -> None:
        """Abort the stream; pending futures fail with RequestCancelledError."""
        self._closing = True
        if self._call is None:
            return
        self._call.cancel()
        await asyncio.gather(*(t for t in (self._reader, self._writer) if t is not None), return_exceptions=True)

    async def __aenter__(self) -> AsyncInferStream:
        self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            await self.close()
        else:
            await self.cancel()
