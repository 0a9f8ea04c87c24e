"""The engine interface in a front-end process: the engine process's models, over IPC.

With ``tensorwire serve --workers N`` each front-end process runs the same listeners and the same data plane
as the single process, over a :class:`RemoteEngine` instead of a ``LocalEngine``. What the data plane needs
on every request is answered here, in this process, without a round trip:

- ``resolve``, ``ready_versions``, ``models_ready`` and ``index`` read the *state* the engine process
  publishes (:mod:`tensorwire.server.engine_service`): which instance serves each model and version (with
  its configuration and signature, so validation and decoding happen here), or the error a call gets.
  Names the engine has no record of get the same NOT_FOUND messages as in one process.
- a submitted request's decoded tensors are sent to the engine's batcher (as their own bytes, see
  :mod:`tensorwire.server.ipc`), and the returned future resolves when the outputs (or the error) come back;
  cancelling sends a withdrawal, so a request whose caller went away never runs if it is still queued.
- the engine counts how each request it received ended; how a request refused here ended (invalid, past its
  deadline on arrival) and every call refused before a model resolved are sent to the engine at once and
  recorded there, in the one ``Metrics`` (ModelStatistics and /metrics show the whole server).

``statistics``, ``repository_index``, ``load`` and ``unload`` are calls to the engine process, answered
from its own state, so every front-end answers them the same.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

from tensorwire.proto import inference_pb2 as pb
from tensorwire.repository import ModelConfigFile
from tensorwire.server import ipc
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.errors import ModelUnavailableError
from tensorwire.server.manager import not_a_version, unknown_model, unknown_version
from tensorwire.server.replicas import EncodedTensor
from tensorwire.server.signature import Signature, TensorSig

log = logging.getLogger("tensorwire.frontend")

#: What a front-end's callers get once the engine process is gone.
ENGINE_GONE = "the server's engine process is gone; this front-end is stopping; retry on another server"


def signature_from(fields: list) -> Signature:
    """The ``Signature`` that ``engine_service.signature_fields`` described."""
    inputs, outputs, max_batch_size = fields
    return Signature(
        tuple(TensorSig(name, datatype, tuple(dims)) for name, datatype, dims in inputs),
        tuple(TensorSig(name, datatype, tuple(dims)) for name, datatype, dims in outputs),
        max_batch_size,
    )


class RemoteScheduler:
    """A version's batcher as a front-end sees it: requests go to the engine process's ``DynamicBatcher``."""

    def __init__(self, engine: RemoteEngine, instance: int, config: ModelConfigFile, latest: bool) -> None:
        self._engine = engine
        self._instance = instance
        self._latest = latest
        self.settings = config.dynamic_batching

    def priority_index(self, priority: int) -> int:
        """A request's priority (1 = highest, 0 = the model's default level) as a queue index (the
        ``DynamicBatcher``'s rule)."""
        if priority == 0:
            priority = self.settings.default_priority_level or self.settings.priority_levels
        return min(priority, self.settings.priority_levels) - 1

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        """Send ``request`` to the engine's batcher; a future of its outputs (see ``Scheduler.submit``)."""
        return self._engine.submit(self._instance, self._latest, request)

    def cancel(self, request: InferenceRequest) -> None:
        """Withdraw ``request`` (it never runs if still queued)."""
        self._engine.cancel(request)


class RemoteStats:
    """A version's outcome counting for requests refused in the front-end: each goes to the engine."""

    def __init__(self, engine: RemoteEngine, instance: int) -> None:
        self._engine = engine
        self._instance = instance

    def begin(self) -> None:
        """Nothing to do here: the engine counts a request in flight when its outcome arrives."""

    def record_success(self, ns: int) -> None:
        self._engine.outcome(self._instance, ns, None)

    def record_failure(self, ns: int, reason: str) -> None:
        self._engine.outcome(self._instance, ns, reason)


class RemoteVersion:
    """One served instance of a model version, as published by the engine process (a ``ServedVersion``),
    resolved by its version number or (``latest``) as the model's latest version.

    The engine counts the outcome of every request that reached it (``counts_outcomes``); this side counts
    only the requests refused before (invalid, past their deadline on arrival).
    """

    counts_outcomes = True

    def __init__(
        self,
        engine: RemoteEngine,
        instance: int,
        name: str,
        version: int,
        config: ModelConfigFile,
        signature: Signature,
        utf8_inputs: frozenset[str],
        latest: bool = False,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.signature = signature
        self.utf8_inputs = utf8_inputs
        self.instance = instance
        self.batcher = RemoteScheduler(engine, instance, config, latest)
        self.stats = RemoteStats(engine, instance)

    def as_latest(self, engine: RemoteEngine) -> RemoteVersion:
        """The same instance, resolved as the model's latest version (''): a request that reaches the engine
        after a reload replaced it runs on whatever version is latest then (same signature)."""
        return RemoteVersion(
            engine,
            self.instance,
            self.name,
            self.version,
            self.config,
            self.signature,
            self.utf8_inputs,
            latest=True,
        )

    async def infer(self, request: InferenceRequest) -> list[EncodedTensor]:
        """Submit ``request`` and await its outputs; a cancelled wait withdraws it."""
        future = self.batcher.submit(request)
        try:
            return await future
        except asyncio.CancelledError:
            self.batcher.cancel(request)
            raise


class RemoteEngine:
    """The ``Engine`` interface over a connection to the engine process's Unix socket (``connect``).

    ``on_state()`` runs after each state is applied, ``on_stop(grace_s)`` when the engine asks this front-end
    to stop, ``on_lost()`` when the connection ends without being asked to (the engine process is gone).
    ``wait_state()`` returns once the first state has arrived (resolve answers NOT_FOUND for every name
    before that).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_state: Callable[[], None] = lambda: None,
        on_stop: Callable[[float], None] = lambda grace_s: None,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._loop = loop
        self.on_state = on_state
        self.on_stop = on_stop
        self.on_lost = on_lost
        self.connection = ipc.Connection(self._on_message, self._connection_lost)
        self.started = False
        self.draining = False
        self.gone = False
        self._models_ready = False
        self._rows: list[tuple[str, str, str, str]] = []
        self._names: dict[str, list] = {}
        self._versions: dict[int, RemoteVersion] = {}
        self._latest: dict[int, RemoteVersion] = {}  # the same instances, resolved as latest ('')
        self._rid = itertools.count(1)
        self._pending: dict[int, tuple[asyncio.Future, InferenceRequest]] = {}
        self._rids: dict[InferenceRequest, int] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count(1)
        self._first_state = loop.create_future()
        self._handlers = {
            ipc.ANSWER: self._answer,
            ipc.FAILED: self._failed,
            ipc.RESULT: self._result,
            ipc.STATE: self._state,
            ipc.STOP: self._stop,
        }

    # ------------------------------------------------------------ messages

    async def connect(self, path: str, index: int, pid: int) -> None:
        """Connect to the engine's socket at ``path`` and introduce this front-end (``index``, ``pid``); the
        engine answers with its state. Raises OSError when the engine is not there."""
        await self._loop.create_unix_connection(lambda: self.connection, path)
        self.connection.send([ipc.HELLO, index, pid])

    def _on_message(self, connection: ipc.Connection, header: list, frames: list) -> None:
        self._handlers[header[0]](header, frames)

    def _connection_lost(self, connection: ipc.Connection) -> None:
        self.lost()
        self.on_lost()

    def listening(self) -> None:
        """Tell the engine this front-end listens on its ports."""
        self.connection.send([ipc.LISTENING])

    async def wait_state(self) -> None:
        await self._first_state

    def _state(self, header: list, frames: list) -> None:
        _, seq, ack, payload = header
        definitions = payload["instances"]
        versions = {}
        for instance, (name, version, config, signature, utf8_inputs) in definitions.items():
            known = self._versions.get(instance)
            versions[instance] = known or RemoteVersion(
                self,
                instance,
                name,
                version,
                ModelConfigFile.model_validate_json(config),
                signature_from(signature),
                frozenset(utf8_inputs),
            )
        self._versions = versions
        self._latest = {
            instance: self._latest.get(instance) or versions[instance].as_latest(self)
            for instance in {entry[0][0] for entry in payload["names"].values() if entry[0][0]}
        }
        self._names = payload["names"]
        self._rows = [tuple(row) for row in payload["rows"]]
        self._models_ready = payload["models_ready"]
        self.started = payload["started"]
        self.draining = payload["draining"]
        if ack:
            self.connection.send([ipc.ACK, seq])
        if not self._first_state.done():
            self._first_state.set_result(None)
        self.on_state()

    def _stop(self, header: list, frames: list) -> None:
        self.on_stop(header[1])

    # ----------------------------------------------------------- inference

    def submit(self, instance: int, latest: bool, request: InferenceRequest) -> asyncio.Future:
        """Send a validated request to instance ``instance``'s batcher (``latest``: it asked for the model's
        latest version); a future of its outputs."""
        future = self._loop.create_future()
        if self.gone:
            future.set_exception(ModelUnavailableError(ENGINE_GONE))
            return future
        rid = next(self._rid)
        specs = []
        buffers = []
        for name, array in request.inputs.items():
            dtype, buffer = ipc.tensor_frame(array)
            specs.append([name, dtype, array.shape])
            buffers.append(buffer)
        header = [
            ipc.SUBMIT,
            rid,
            instance,
            latest,
            request.priority,
            request.deadline,
            request.rows,
            request.outputs,
            request.request_id,
            request.arrival_ns,  # CLOCK_MONOTONIC (perf_counter): comparable in the engine process
            specs,
        ]
        self.connection.send(header, *buffers)
        request.inputs = {}  # the transport holds what the socket did not take yet; the engine the rest
        request.future = future
        self._pending[rid] = (future, request)
        self._rids[request] = rid
        return future

    def cancel(self, request: InferenceRequest) -> None:
        """Withdraw a submitted request from the engine's batcher (nothing if it was answered)."""
        rid = self._rids.pop(request, None)
        if rid is None:
            return
        self._pending.pop(rid, None)
        if not self.gone:
            self.connection.send([ipc.CANCEL, rid])

    def _waiting(self, rid: int) -> asyncio.Future | None:
        """The still-waiting future of request ``rid``, now answered here (None if cancelled or done)."""
        entry = self._pending.pop(rid, None)
        if entry is None:
            return None
        future, request = entry
        del self._rids[request]
        return None if future.done() else future

    def _answer(self, header: list, frames: list) -> None:
        future = self._waiting(header[1])
        if future is not None:
            tensors = zip(header[2], frames, strict=True)
            # A large output arrives as a view of its message's buffer; the front-ends' encoders want bytes.
            future.set_result(
                [
                    (name, datatype, shape, raw if type(raw) is bytes else bytes(raw))
                    for (name, datatype, shape), raw in tensors
                ]
            )

    def _failed(self, header: list, frames: list) -> None:
        future = self._waiting(header[1])
        if future is not None:
            future.set_exception(ipc.error_from(header[2]))

    # ------------------------------------------------------ outcomes, refusals

    def outcome(self, instance: int, ns: int, reason: str | None) -> None:
        """Record in the engine how a request of ``instance`` that never reached it ended (``reason`` None:
        success, which cannot happen without the engine; kept for the interface). Sent at once, ahead of the
        answer, so statistics read after it include it."""
        if not self.gone:
            self.connection.send([ipc.EVENTS, [[instance, ns, reason]], []])

    def refuse(self, method: str, reason: str) -> None:
        """Count a call refused before a version resolved (in the engine's metrics; sent at once)."""
        if not self.gone:
            self.connection.send([ipc.EVENTS, [], [[method, reason]]])

    # ----------------------------------------------------------- the state

    def resolve(self, name: str, version: str = "") -> RemoteVersion:
        """The instance serving a call, from the engine's state: ModelNotFoundError or
        ModelUnavailableError with the engine's own messages."""
        entry = self._names.get(name)
        if entry is None:
            raise unknown_model(name)
        if version:
            if not (version.isascii() and version.isdigit()):
                raise not_a_version(name, version)
            reference = entry[1].get(int(version))
            if reference is None:
                raise unknown_version(name, int(version), entry[2])
            instance, error = reference
            if error is not None:
                raise ipc.error_from(error)
            return self._versions[instance]
        instance, error = entry[0]
        if error is not None:
            raise ipc.error_from(error)
        return self._latest[instance]

    def ready_versions(self, name: str) -> list[int]:
        entry = self._names.get(name)
        return list(entry[2]) if entry is not None else []

    def served_versions(self) -> list[RemoteVersion]:
        return list(self._versions.values())

    def models_ready(self) -> bool:
        return self._models_ready

    def index(self, repository_models: bool = True) -> list[tuple[str, str, str, str]]:
        """The engine's version records (as of its last state; without the repository's unloaded folders:
        ``repository_index`` asks the engine for those)."""
        return list(self._rows)

    # --------------------------------------------------------------- calls

    async def _call(self, op: str, *args: Any) -> Any:
        if self.gone:
            raise ModelUnavailableError(ENGINE_GONE)
        call_id = next(self._call_ids)
        future = self._calls[call_id] = self._loop.create_future()
        self.connection.send([ipc.CALL, call_id, op, list(args)])
        try:
            return await asyncio.shield(future)
        finally:
            self._calls.pop(call_id, None)

    def _result(self, header: list, frames: list) -> None:
        _, call_id, ok, value = header
        future = self._calls.get(call_id)
        if future is None or future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(ipc.error_from(value))

    async def repository_index(self) -> list[tuple[str, str, str, str]]:
        return [tuple(row) for row in await self._call("index")]

    async def statistics(self, name: str = "", version: int | None = None) -> list[pb.ModelStatistics]:
        return [pb.ModelStatistics.FromString(raw) for raw in await self._call("statistics", name, version)]

    async def load(self, name: str) -> None:
        await self._call("load", name)

    async def unload(self, name: str) -> None:
        await self._call("unload", name)

    # ----------------------------------------------------------- lifecycle

    def lost(self) -> None:
        """The engine process is gone: every request and call waiting on it fails with UNAVAILABLE."""
        if self.gone:
            return
        self.gone = True
        error = ModelUnavailableError(ENGINE_GONE)
        for future, _ in self._pending.values():
            if not future.done():
                future.set_exception(error)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        self._rids.clear()
        self._models_ready = False
        self.started = False

    def close(self) -> None:
        self.connection.close()
