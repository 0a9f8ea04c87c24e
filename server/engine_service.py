"""The engine process's side of the IPC: the ModelManager's batchers and state, served to front-end processes.

``tensorwire serve --workers N`` keeps every model's batcher and replicas in the engine process, so a batch
forms across the connections of every front-end and each device holds each model once. The front-ends
(:mod:`tensorwire.server.remote_engine`) validate and decode requests and send them here; this service:

- queues each submitted request in its version's ``DynamicBatcher`` exactly as the in-process engine does
  (same admission, queue bounds and pushback, priorities, deadline timers, cancellation) and sends the
  outputs, or the error, back to the front-end that sent it;
- publishes the *state* the front-ends resolve names and answer readiness from (which instance serves each
  model and version, or the error a call gets; the READY versions; strict readiness; the index rows the
  health statuses follow; ``started`` and ``draining``), whenever it changes and to every new front-end.
  After a load or unload the new state is acknowledged by every front-end before the call returns, so a
  client that saw a load finish through one connection finds the model ready through any other;
- counts how each request that reached it ended (success before its answer leaves, so statistics read
  after an answer include it; failures; withdrawals), and records what the front-ends report (requests
  refused before they reached the engine, calls refused before a model resolved) in the one ``Metrics``,
  so ModelStatistics and /metrics show the whole server;
- answers the calls that need the engine's own state: load, unload, RepositoryIndex, ModelStatistics.

An instance (one load of one version) is known to front-ends by a number, so that a request validated
against one load's signature is never run by another with a different signature: a request that reaches
the engine just after a reload swapped its instance out goes to the new instance when the signature is the
same (in one process, resolving and queueing are one step, so no request sees a swap between them);
otherwise the retiring instance refuses it (UNAVAILABLE, retry), as an unload does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from tensorwire.server import ipc
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.engine import version_statistics
from tensorwire.server.errors import ModelUnavailableError, ServingError
from tensorwire.server.manager import ModelManager
from tensorwire.server.model_version import ModelVersion
from tensorwire.server.signature import Signature
from tensorwire.server.stats import Metrics, failure_reason


def _reason(err: BaseException) -> str:
    """The ``stats.REASONS`` key of how a request failed (a non-ServingError is a bug of ours: internal)."""
    return failure_reason(err) if isinstance(err, ServingError) else "internal"


log = logging.getLogger("tensorwire.engine")

#: How often the state is recomputed and sent when it changed (a replica lost, a model that finished loading).
STATE_INTERVAL_S = 0.2
#: The longest a load or unload waits for the front-ends to acknowledge the new state before it returns.
ACK_TIMEOUT_S = 2.0
#: Retired instances remembered for rerouting (a few per reload; older ones cannot have requests in flight).
MAX_IDENTITIES = 4096


@dataclass
class FrontendLink:
    """One connected front-end process: its connection, index, pid and the requests it has in the engine."""

    connection: ipc.Connection
    index: int
    pid: int
    listening: bool = False
    submitted: Any = None  # its child of tensorwire_frontend_requests_total
    #: rid -> (the request in its batcher, its version, when the front-end received it: perf_counter_ns)
    pending: dict[int, tuple[InferenceRequest, ModelVersion, int]] = field(default_factory=dict)


def signature_fields(version: ModelVersion) -> list:
    """A served signature as plain lists (``[[name, datatype, dims]...]`` inputs and outputs, max_batch_size)."""
    sig = version.signature
    return [
        [[t.name, t.datatype, list(t.dims)] for t in sig.inputs],
        [[t.name, t.datatype, list(t.dims)] for t in sig.outputs],
        sig.max_batch_size,
    ]


class EngineService:
    """Serves ``manager``'s models to front-end processes connecting to the Unix socket at ``path``
    (``start`` listens).

    ``metrics``: the server's one ``Metrics`` (outcomes and refusals of every front-end are recorded here).
    ``started`` and ``draining`` are published with the state. ``on_listening(index)`` runs when a
    front-end reports that it listens on the ports, ``on_lost(index, pid)`` when its connection ends.
    """

    def __init__(
        self,
        manager: ModelManager,
        metrics: Metrics,
        path: str,
        loop: asyncio.AbstractEventLoop,
        on_listening: Callable[[int], None] = lambda index: None,
    ) -> None:
        self.manager = manager
        self.metrics = metrics
        self.path = path
        self.started = False
        self.draining = False
        self._loop = loop
        self._on_listening = on_listening
        self._server: asyncio.AbstractServer | None = None
        self.frontends: dict[ipc.Connection, FrontendLink] = {}
        self._submitted = Counter(
            "tensorwire_frontend_requests",
            "Inference requests each front-end process sent to the engine (how SO_REUSEPORT spread the load)",
            ("frontend",),
            registry=metrics.registry,
        )
        self._ids = itertools.count(1)
        self._instance_ids: dict[ModelVersion, int] = {}
        self._instances: dict[int, ModelVersion] = {}
        self._definitions: dict[int, list] = {}
        #: (name, version, signature) of every instance ever published (the latest MAX_IDENTITIES), so that a
        #: request for an instance retired by a reload can go to its successor.
        self._identities: dict[int, tuple[str, int, Signature]] = {}
        self._state: Any = None
        self._seq = 0
        self._acks: dict[int, tuple[set[ipc.Connection], asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._handlers = {
            ipc.SUBMIT: self._submit,
            ipc.CANCEL: self._cancel,
            ipc.EVENTS: self._events,
            ipc.CALL: self._call,
            ipc.ACK: self._ack,
            ipc.HELLO: self._hello,
            ipc.LISTENING: self._listening,
        }

    # ---------------------------------------------------------------- messages

    async def start(self) -> None:
        """Listen on the Unix socket (its folder must be this user's alone)."""
        self._server = await self._loop.create_unix_server(
            lambda: ipc.Connection(self._on_message, self._on_lost), self.path
        )

    def _on_message(self, connection: ipc.Connection, header: list, frames: list) -> None:
        link = connection.link
        if link is None and header[0] != ipc.HELLO:
            return  # not introduced (or declared gone): whatever it sent is dropped
        self._handlers[header[0]](connection, link, header, frames)

    def _on_lost(self, connection: ipc.Connection) -> None:
        link = connection.link
        if link is not None and connection in self.frontends:
            withdrawn = self.frontend_gone(connection)
            log.info("event=frontend_disconnected index=%d pid=%d withdrawn=%d", link.index, link.pid, withdrawn)

    def _hello(self, connection: ipc.Connection, link: FrontendLink | None, header: list, frames: list) -> None:
        _, index, pid = header
        link = FrontendLink(connection, index, pid, submitted=self._submitted.labels(str(index)))
        connection.link = self.frontends[connection] = link
        log.debug("event=frontend_connected index=%d pid=%d", index, pid)
        self.publish(force_to=connection)

    def _listening(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        link.listening = True
        self._on_listening(link.index)

    def _submit(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        _, rid, instance, latest, priority, deadline, rows, outputs, request_id, arrival_ns, specs = header
        link.submitted.inc()
        version = self._serving(instance, latest)
        if version is None:
            error = ModelUnavailableError("the model version this request was validated for is no longer served")
            connection.send([ipc.FAILED, rid, ipc.error_fields(error)])
            return
        batched = version.signature.batched
        batcher = version.batcher
        stats = version.stats
        stats.begin()
        try:
            arrays = {}
            key = []
            for (name, dtype, shape), frame in zip(specs, frames, strict=True):
                arrays[name] = ipc.tensor_from(dtype, shape, frame)
                key.append((name, tuple(shape[1:]) if batched else tuple(shape)))
            request = InferenceRequest(
                arrays,
                rows,
                outputs,
                request_id,
                min(max(priority, 0), batcher.settings.priority_levels - 1),
                deadline,
                tuple(key),
            )
            future = batcher.submit(request)
        except Exception as err:  # noqa: BLE001 - ServingErrors as they are; a bug of ours as INTERNAL
            if not isinstance(err, ServingError):
                log.error("event=submit_failed model=%s error=%r", version.label, err, exc_info=err)
            stats.record_failure(time.perf_counter_ns() - arrival_ns, _reason(err))
            connection.send([ipc.FAILED, rid, ipc.error_fields(err)])
            return
        link.pending[rid] = (request, version, arrival_ns)
        future.add_done_callback(lambda done: self._answer(link, rid, done))

    def _answer(self, link: FrontendLink, rid: int, future: asyncio.Future) -> None:
        entry = link.pending.pop(rid, None)
        if entry is None or future.cancelled():
            return  # withdrawn by its front-end (or the front-end is gone): counted then
        _, version, arrival_ns = entry
        error = future.exception()
        if error is not None:
            version.stats.record_failure(time.perf_counter_ns() - arrival_ns, _reason(error))
            link.connection.send([ipc.FAILED, rid, ipc.error_fields(error)])
            return
        outputs = future.result()
        # Counted before the answer leaves: statistics read after an answer arrived include it.
        version.stats.record_success(time.perf_counter_ns() - arrival_ns)
        link.connection.send(
            [ipc.ANSWER, rid, [[name, datatype, list(shape)] for name, datatype, shape, _ in outputs]],
            *(raw for *_, raw in outputs),
        )

    def _cancel(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        entry = link.pending.pop(header[1], None)
        if entry is not None:
            request, version, arrival_ns = entry
            version.batcher.cancel(request)
            version.stats.record_failure(time.perf_counter_ns() - arrival_ns, "cancelled")

    def _events(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        _, outcomes, refusals = header
        instances = self._instances
        for instance, ns, reason in outcomes:
            version = instances.get(instance)
            if version is None:
                continue  # its counters went with the version
            stats = version.stats
            stats.begin()
            if reason is None:
                stats.record_success(ns)
            else:
                stats.record_failure(ns, reason)
        for method, reason in refusals:
            self.metrics.refuse(method, reason)

    def _ack(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        waiting = self._acks.get(header[1])
        if waiting is None:
            return
        missing, future = waiting
        missing.discard(connection)
        if not missing and not future.done():
            future.set_result(None)

    # ------------------------------------------------------------------- calls

    def _call(self, connection: ipc.Connection, link: FrontendLink, header: list, frames: list) -> None:
        task = self._loop.create_task(self._run_call(connection, header[1], header[2], header[3]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_call(self, connection: ipc.Connection, call_id: int, op: str, args: list) -> None:
        try:
            value = await self._perform(op, args)
        except ServingError as err:
            connection.send([ipc.RESULT, call_id, False, ipc.error_fields(err)])
        except Exception as err:  # noqa: BLE001 - a bug of ours: INTERNAL, traceback to the log
            log.error("event=engine_call_failed op=%s error=%r", op, err, exc_info=err)
            connection.send([ipc.RESULT, call_id, False, ipc.error_fields(err)])
        else:
            connection.send([ipc.RESULT, call_id, True, value])

    async def _perform(self, op: str, args: list) -> Any:
        manager = self.manager
        if op == "index":
            return [list(row) for row in manager.index()]
        if op == "statistics":
            name, version = args
            return [s.SerializeToString() for s in version_statistics(manager.served_versions(), name, version)]
        if op in ("load", "unload"):
            try:
                await (manager.load if op == "load" else manager.unload)(args[0])
            finally:
                await self.publish_acknowledged()
            return None
        raise ValueError(f"unknown engine call {op!r}")

    # ------------------------------------------------------------------- state

    def _instance_id(self, version: ModelVersion) -> int:
        instance = self._instance_ids.get(version)
        if instance is None:
            instance = self._instance_ids[version] = next(self._ids)
            self._instances[instance] = version
            self._identities[instance] = (version.name, version.version, version.signature)
            while len(self._identities) > MAX_IDENTITIES:
                del self._identities[next(iter(self._identities))]
            self._definitions[instance] = [
                version.name,
                version.version,
                version.config.model_dump_json(),
                signature_fields(version),
                sorted(version.utf8_inputs),
            ]
        return instance

    def _reference(self, name: str, version: str) -> list:
        """``[instance, None]`` for the instance serving (name, version), or ``[0, error]``."""
        try:
            served = self.manager.resolve(name, version)
        except ServingError as err:
            return [0, ipc.error_fields(err)]
        return [self._instance_id(served), None]

    def _current_state(self) -> dict:
        manager = self.manager
        rows = [list(row) for row in manager.index(repository_models=False)]
        names: dict[str, list] = {}
        for name, version, _, _ in rows:
            entry = names.get(name)
            if entry is None:
                entry = names[name] = [self._reference(name, ""), {}, manager.ready_versions(name)]
            if version:
                entry[1][int(version)] = self._reference(name, version)
        return {
            "started": self.started,
            "draining": self.draining,
            "models_ready": manager.models_ready(),
            "rows": rows,
            "names": names,
        }

    def _serving(self, instance: int, latest: bool) -> ModelVersion | None:
        """The version to run a request validated against ``instance``: that instance while it takes work;
        once a reload replaced it (the front-end resolved it a moment before the swap), the version now
        serving the same model and version number (``latest``: the model's latest version, as the request
        asked) if its signature is the same (the request is valid there, as it would have been in one
        process, where resolving and queueing are one step); else the retiring instance (its batcher
        refuses: UNAVAILABLE, retry) or None when it is gone."""
        version = self._instances.get(instance)
        if version is not None and not version.retiring:
            return version
        known = self._identities.get(instance)
        if known is None:
            return version
        name, number, signature = known
        try:
            current = self.manager.resolve(name, "" if latest else str(number))
        except ServingError:
            return version
        return current if current.signature == signature else version

    def _forget_retired(self) -> None:
        """Forget instances that are no longer served (retired: no request of theirs can still run)."""
        served = set(self.manager.served_versions())
        for version, instance in list(self._instance_ids.items()):
            if version not in served:
                del self._instance_ids[version]
                del self._instances[instance]
                del self._definitions[instance]

    def publish(self, force_to: ipc.Connection | None = None, ack: bool = False) -> int:
        """Send the state to every front-end if it changed (or to ``force_to`` in any case); returns its
        sequence number. With ``ack`` it is sent even when unchanged, asking each front-end to acknowledge."""
        self._forget_retired()
        state = self._current_state()
        changed = state != self._state
        if changed or ack:
            self._state = state
            self._seq += 1
        targets = list(self.frontends) if changed or ack else [force_to] if force_to else []
        if not targets:
            return self._seq
        referenced = {ref[0] for entry in state["names"].values() for ref in (entry[0], *entry[1].values()) if ref[0]}
        payload = dict(state, instances={i: self._definitions[i] for i in referenced})
        for connection in targets:
            connection.send([ipc.STATE, self._seq, ack, payload])
        return self._seq

    async def publish_acknowledged(self) -> None:
        """Publish the state and wait (at most ``ACK_TIMEOUT_S``) until every front-end has applied it."""
        waiting = set(self.frontends)
        future = self._loop.create_future()
        seq = self.publish(ack=True)
        if not waiting:
            return
        self._acks[seq] = (waiting, future)
        try:
            await asyncio.wait_for(future, ACK_TIMEOUT_S)
        except TimeoutError:
            log.warning("event=state_ack_timeout frontends_missing=%d", len(waiting))
        finally:
            self._acks.pop(seq, None)

    async def publish_loop(self) -> None:
        """Publish state changes every ``STATE_INTERVAL_S`` (the changes no call announces: a model that
        finished loading at start-up, a replica lost or replaced)."""
        while True:
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("event=publish_failed")
            await asyncio.sleep(STATE_INTERVAL_S)

    # ---------------------------------------------------------------- lifecycle

    def frontend_gone(self, connection: ipc.Connection) -> int:
        """A front-end process ended (its connection did): withdraw its requests (counted ``cancelled``: their
        callers' connections went with it) and stop waiting for its acknowledgements. Returns how many
        requests were withdrawn."""
        link = self.frontends.pop(connection, None)
        if link is None:
            return 0
        connection.link = None
        connection.close()
        now = time.perf_counter_ns()
        for request, version, arrival_ns in link.pending.values():
            version.batcher.cancel(request)
            version.stats.record_failure(now - arrival_ns, "cancelled")
        for missing, future in list(self._acks.values()):
            missing.discard(connection)
            if not missing and not future.done():
                future.set_result(None)
        withdrawn = len(link.pending)
        link.pending.clear()
        return withdrawn

    def stop_frontends(self, grace_s: float) -> None:
        """Tell every front-end to close its ports (answers in flight get ``grace_s`` seconds) and exit."""
        for connection in list(self.frontends):
            connection.send([ipc.STOP, grace_s])

    def frontend_exited(self, pid: int) -> int:
        """The front-end process ``pid`` exited: ``frontend_gone`` for its connection if it is still open."""
        for connection, link in list(self.frontends.items()):
            if link.pid == pid:
                return self.frontend_gone(connection)
        return 0

    def frontend_pids(self) -> dict[int, int]:
        """index -> pid of every connected front-end."""
        return {link.index: link.pid for link in self.frontends.values()}

    def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.frontends):
            connection.close()
