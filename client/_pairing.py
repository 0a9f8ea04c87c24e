"""Pairing stream answers with their requests, for the blocking and the asyncio stream alike.

Every request sent on a ``ModelStreamInfer`` call carries an id: the caller's
``request_id`` or, without one, an id generated here (``tw-<stream>-<n>``). Servers echo
it in ``ModelStreamInferResponse.infer_response.id``, errors included (tensorwire and
Triton do), and each answer settles the future registered under its id. Pairing by id
keeps every answer with its own request even when the client's and the server's view of
what was sent could differ (a submit abandoned half way, an answer for a future the
caller cancelled). Equal caller ids in flight at once pair in sending order, which is
the order a stream answers in. A server that echoes no id (an empty one) gets the
oldest request's future, as answers come in order.

The ledger itself does no I/O and takes no lock: each stream guards it its own way
(a condition variable in the blocking stream, the event loop in the asyncio one).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import secrets
from collections.abc import Mapping
from typing import Any, Generic, Protocol, TypeVar

from tensorwire.client._convert import Inputs, Outputs, ParamValue, parse_response
from tensorwire.client._core import ClientBase, Plan
from tensorwire.client.errors import InferenceServerError, from_stream_message
from tensorwire.proto import inference_pb2 as pb

log = logging.getLogger("tensorwire.client")


class _Future(Protocol):
    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException) -> None: ...


F = TypeVar("F", bound=_Future)

#: Raised by ``set_result``/``set_exception`` on a future its caller cancelled meanwhile.
_ALREADY_DONE = (concurrent.futures.InvalidStateError, asyncio.InvalidStateError)


class StreamLedger(Generic[F]):
    """The requests of one stream that await answers: id -> future, in sending order.

    ``add`` registers a request just before it is handed to gRPC (assigning an id when it
    has none); ``take`` finds the future an answer belongs to; ``drain`` removes them all
    when the stream ends. Every operation is O(1).
    """

    def __init__(self) -> None:
        self._prefix = f"tw-{secrets.token_hex(4)}-"
        self._counter = itertools.count(1)
        self._order = itertools.count()
        self._entries: dict[int, tuple[str, F]] = {}  # sending order -> (id, future)
        self._by_id: dict[str, collections.deque[int]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, request: pb.ModelInferRequest, future: F) -> None:
        """Register ``future`` for ``request``; gives the request a generated id if it has none."""
        if not request.id:
            request.id = f"{self._prefix}{next(self._counter)}"
        seq = next(self._order)
        self._entries[seq] = (request.id, future)
        self._by_id.setdefault(request.id, collections.deque()).append(seq)

    def oldest(self) -> F | None:
        """The future of the oldest request still awaiting its answer (None when there is none)."""
        for _, future in self._entries.values():
            return future
        return None

    def take(self, response: pb.ModelStreamInferResponse) -> F | None:
        """Remove and return the future that ``response`` answers; None if it answers none of them."""
        answer_id = response.infer_response.id
        if not answer_id:
            if not self._entries:
                return None
            seq = next(iter(self._entries))
            answer_id = self._entries[seq][0]
        queue = self._by_id.get(answer_id)
        if not queue:
            return None
        seq = queue.popleft()
        if not queue:
            del self._by_id[answer_id]
        return self._entries.pop(seq)[1]

    def drain(self) -> list[F]:
        """Remove and return every future still waiting (the stream is over)."""
        futures = [future for _, future in self._entries.values()]
        self._entries.clear()
        self._by_id.clear()
        return futures


def settle(future: _Future, response: pb.ModelStreamInferResponse, bf16_as: str) -> InferenceServerError | None:
    """Resolve ``future`` from its answer: an InferResult, or the request's own error.

    Returns the error (None on success), so the stream can tell its client about answers
    that make cached model metadata stale. A future the caller cancelled is left as it is.
    """
    error: InferenceServerError | None = None
    if response.error_message:
        error = from_stream_message(response.error_message)
    else:
        try:
            result = parse_response(response.infer_response, bf16_as)
        except InferenceServerError as malformed:
            error = malformed
    if future.done():
        return error
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    except _ALREADY_DONE:
        pass
    return error


def fail(futures: list[Any], error: BaseException) -> None:
    """Fail every future not yet done with ``error`` (the stream ended before their answers)."""
    for future in futures:
        if not future.done():
            try:
                future.set_exception(error)
            except _ALREADY_DONE:
                pass


class StreamBase(Generic[F]):
    """What the blocking and the asyncio stream share: their settings, ledger and answer handling.

    Subclasses do the I/O (threads or tasks) and guard ``_ledger`` their own way.
    """

    def __init__(
        self,
        client: ClientBase,
        model: str,
        *,
        version: int | str | None,
        outputs: Outputs | None,
        max_in_flight: int,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.model = model
        self._client = client
        self._version = version
        self._outputs = outputs
        self._max_in_flight = max_in_flight
        self._ledger: StreamLedger[F] = StreamLedger()
        self._error: InferenceServerError | None = None
        self._closing = False

    def _request_plan(
        self,
        inputs: Inputs | Any,
        request_id: str | None,
        priority: int | None,
        parameters: Mapping[str, ParamValue] | None,
    ) -> Plan[pb.ModelInferRequest | InferenceServerError]:
        """The client core's plan for one request of this stream (see ``ClientBase._plan_stream_request``)."""
        return self._client._plan_stream_request(
            self.model, self._version, self._outputs, inputs, request_id, priority, parameters
        )

    def _settle(self, future: F | None, response: pb.ModelStreamInferResponse) -> None:
        """Resolve ``future`` (taken from the ledger for ``response``); None: an answer nobody awaits."""
        if future is None:
            log.warning(
                "stream for %r: an answer for request id %r, which awaits none; ignored",
                self.model,
                response.infer_response.id,
            )
            return
        error = settle(future, response, self._client._bf16_as)
        if error is not None:
            self._client._note_failure(self.model, self._version, error)
