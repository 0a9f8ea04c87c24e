"""The dynamic batcher: one per model version, living on the event loop.

Work-conserving: whenever a replica is free and work is queued, a batch goes
out at once, unless the arrival rate says that waiting (at most
``max_queue_delay_us`` past the oldest request) will reach a preferred size.
While every replica is busy, requests pile up and the next batch takes all
that fits. So low load sees batch ≈ 1 with no added latency, and high load
sees large batches with no timer in the way.

Deadlines are enforced by timers, not when a batch finishes: an expired
queued request is answered DEADLINE_EXCEEDED and is never executed; a
cancelled one is dropped from the queue and never executed.

Statistics: the batcher reports each batch run (``record_execution``) and each
request that got its outputs (``record_inference``); how a request ended
(success or failure with its reason) is the front-end's to count, once.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from tensorwire.repository import DynamicBatching
from tensorwire.server.errors import (
    DeadlineExceededError,
    ModelUnavailableError,
    QueueFullError,
)
from tensorwire.server.replicas import BatchOutcome, Replica, WorkItem
from tensorwire.server.stats import ModelVersionStats

QUEUED, RUNNING, DONE, CANCELLED, EXPIRED = "queued", "running", "done", "cancelled", "expired"


class InferenceRequest(WorkItem):
    """A validated request waiting for, or in, a batch (a slotted class: one is made per request)."""

    __slots__ = (
        "request_id",
        "priority",
        "deadline",
        "shape_key",
        "future",
        "arrival_ns",
        "state",
        "timer",
        "dispatch_ns",
    )

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        outputs: Sequence[str],
        request_id: str = "",
        priority: int = 0,
        deadline: float | None = None,
        shape_key: tuple = (),
    ) -> None:
        self.inputs, self.rows, self.outputs = inputs, rows, outputs
        self.request_id = request_id
        self.priority = priority  # queue index: 0 is the highest level
        self.deadline = deadline  # event-loop time
        self.shape_key = shape_key  # requests share a batch only when their non-batch shapes agree
        self.future: asyncio.Future | None = None
        self.arrival_ns = time.perf_counter_ns()
        self.state = QUEUED
        self.timer: asyncio.TimerHandle | None = None
        self.dispatch_ns = 0  # when its batch went to a replica: queue time = dispatch_ns - arrival_ns


def shape_key(inputs: dict[str, np.ndarray], batched: bool) -> tuple:
    """Requests may share a batch only when their non-batch shapes agree."""
    return tuple((name, array.shape[1:] if batched else array.shape) for name, array in inputs.items())


class DynamicBatcher:
    """Queues, forms batches and hands them to idle replicas."""

    def __init__(
        self,
        label: str,
        max_batch_size: int,
        settings: DynamicBatching,
        replicas: Sequence[Replica],
        stats: ModelVersionStats,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.label = label
        self.max_batch_size = max(max_batch_size, 1)
        self.combine = max_batch_size > 0 and settings.enabled
        self.settings = settings
        self.stats = stats
        self._loop = loop
        self._replicas = list(replicas)
        self._idle: list[Replica] = list(reversed(self._replicas))
        self._queues: list[deque[InferenceRequest]] = [deque() for _ in range(settings.priority_levels)]
        self._queued = 0
        self._running = 0
        self._delay_ns = settings.max_queue_delay_us * 1000
        targets = settings.preferred_batch_sizes or [self.max_batch_size]
        self._preferred = sorted(set(targets))
        self._preferred_set = set(settings.preferred_batch_sizes)
        self._delay_timer: asyncio.TimerHandle | None = None
        self._running_since: dict[int, tuple[int, int]] = {}  # replica index -> (dispatch ns, requests)
        self._last_arrival_ns = 0
        self._gap_ns = float("inf")  # moving average of the time between arrivals
        self._service_ns = 0.0  # moving average of a batch's wall time per request in it (0: none measured)
        self._accepting = True
        self._schedule_pending = False
        self._idle_event = asyncio.Event()
        self._idle_event.set()

    # ------------------------------------------------------------ intake

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return self._queued + self._running

    def priority_index(self, priority: int) -> int:
        """Map a request's priority (1 = highest, 0 = the model's default) to a queue index."""
        if priority == 0:
            priority = self.settings.default_priority_level or self.settings.priority_levels
        return min(priority, self.settings.priority_levels) - 1

    def submit(self, request: InferenceRequest) -> asyncio.Future:
        """Admit a validated request (on the event loop); a future of its outputs.

        ``request.inputs`` hold the served datatypes with the batch dimension first for batched models
        (``request.rows`` rows, at most max_batch_size), ``request.deadline`` is event-loop time in
        seconds (or None) and ``request.priority`` a queue index. The future resolves to one
        ``(name, datatype, shape, raw bytes)`` tuple per requested output (the request's own rows only) or
        fails with a ServingError: DeadlineExceededError (deadline passed, queued or running, or the
        model's execution timeout), InvalidRequestError (the runtime rejected the data), BackendError
        (the model failed), ModelUnavailableError (unloaded past its grace period).
        Raises at once: ModelUnavailableError while unloading or draining, QueueFullError beyond
        max_queue_size (with a retry hint in ms).
        """
        if not self._accepting:
            raise ModelUnavailableError(f"model {self.label} is unloading or the server is draining; retry elsewhere")
        if self._queued >= self.settings.max_queue_size:
            raise QueueFullError(
                f"model {self.label} has {self._queued} requests queued (max_queue_size "
                f"{self.settings.max_queue_size}); retry after a short pause",
                retry_after_ms=self._pushback_ms(),
            )
        request.future = self._loop.create_future()
        if request.deadline is not None:
            request.timer = self._loop.call_at(request.deadline, self._expire, request)
        self._queues[request.priority].append(request)
        self._queued += 1
        self._idle_event.clear()
        self.stats.pending_gauge.inc()
        now = request.arrival_ns
        if self._last_arrival_ns:
            gap = now - self._last_arrival_ns
            self._gap_ns = gap if self._gap_ns == float("inf") else 0.8 * self._gap_ns + 0.2 * gap
        self._last_arrival_ns = now
        if not self._schedule_pending:
            # Form the batch at the end of this loop iteration: requests that arrive in the
            # same iteration go out together, at no added latency (no timer involved).
            self._schedule_pending = True
            self._loop.call_soon(self._deferred_schedule)
        return request.future

    def _deferred_schedule(self) -> None:
        self._schedule_pending = False
        self._schedule()

    def cancel(self, request: InferenceRequest) -> None:
        """The caller went away: drop a queued request (it will never run)."""
        if request.state == QUEUED:
            self._leave_queue(request, CANCELLED)
        elif request.state == RUNNING:
            request.state = CANCELLED  # the result, when it comes, is dropped

    def _expire(self, request: InferenceRequest) -> None:
        waited_ms = (time.perf_counter_ns() - request.arrival_ns) / 1e6
        if request.state == QUEUED:
            self._leave_queue(request, EXPIRED)
            message = f"deadline passed after {waited_ms:.1f} ms in the queue of {self.label}; the request was not run"
        elif request.state == RUNNING:
            request.state = EXPIRED
            message = f"deadline passed after {waited_ms:.1f} ms while {self.label} was running the request"
        else:
            return
        if request.future is not None and not request.future.done():
            request.future.set_exception(DeadlineExceededError(message))

    def _leave_queue(self, request: InferenceRequest, state: str) -> None:
        request.state = state
        self._queued -= 1
        self.stats.pending_gauge.dec()
        if request.timer is not None and state != EXPIRED:
            request.timer.cancel()
        self._maybe_idle()

    def _pushback_ms(self) -> int:
        """The retry hint for a refused request (``grpc-retry-pushback-ms``): how long the replicas take to
        work off the queue ahead, from the measured service rate.

        Service time per request is a moving average of each batch's wall time (dispatch to outputs)
        divided by the requests in it; the replicas work in parallel. Before any batch has finished, the
        time the running batches have taken so far (per request in them) is the lower bound used.
        Clamped to [1 ms, 60 s]: a client waits it out only when it fits the call's deadline.
        """
        per_request_ns = self._service_ns
        if not per_request_ns:
            now = time.perf_counter_ns()
            running = [(now - since) / n for since, n in self._running_since.values()]
            per_request_ns = max(running, default=1e6)
        clear_ns = self._queued * per_request_ns / max(1, len(self._replicas))
        return int(max(1, min(60_000, clear_ns / 1e6)))

    # ---------------------------------------------------------- dispatch

    def _schedule(self) -> None:
        """Dispatch batches while a replica is idle and work is queued."""
        while self._idle and self._queued:
            batch, rows = self._collect()
            if not batch:
                return
            reason = self._flush_reason(batch, rows)
            if reason is None:
                return  # waiting for companions; the delay timer calls back
            self._dispatch(batch, rows, reason)

    def _collect(self) -> tuple[list[InferenceRequest], int]:
        """The next batch: highest priority first, FIFO, same shapes, up to max_batch_size rows."""
        batch: list[InferenceRequest] = []
        rows, key = 0, None
        for queue in self._queues:
            while queue and queue[0].state != QUEUED:
                queue.popleft()
            for request in queue:
                if request.state != QUEUED:
                    continue
                if key is None:
                    key = request.shape_key
                elif request.shape_key != key:
                    continue
                if rows + request.rows > self.max_batch_size:
                    return batch, rows
                batch.append(request)
                rows += request.rows
                if not self.combine or rows == self.max_batch_size:
                    return batch, rows
        return batch, rows

    def _flush_reason(self, batch: list[InferenceRequest], rows: int) -> str | None:
        if not self.combine:
            return "replica_idle"
        if rows >= self.max_batch_size:
            return "full"
        if rows in self._preferred_set:
            return "preferred"
        if self._delay_ns == 0 or rows >= self._preferred[-1]:
            return "replica_idle"
        now = time.perf_counter_ns()
        expires = batch[0].arrival_ns + self._delay_ns
        if now >= expires:
            return "delay_expired"
        target = self._preferred[bisect.bisect_right(self._preferred, rows)]
        expected = (expires - now) / self._gap_ns if self._gap_ns > 0 else float("inf")
        if rows + expected < target:
            return "replica_idle"  # waiting would not reach a preferred size: go now
        self._arm_delay_timer(expires - now)
        return None

    def _arm_delay_timer(self, wait_ns: int) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
        self._delay_timer = self._loop.call_later(wait_ns / 1e9, self._on_delay_timer)

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._schedule()

    def _dispatch(self, batch: list[InferenceRequest], rows: int, reason: str) -> None:
        taken = set(map(id, batch))
        for queue in self._queues:
            if queue and id(queue[0]) in taken:
                while queue and id(queue[0]) in taken:
                    queue.popleft()
        if any(id(r) in taken for q in self._queues for r in q):  # batch skipped over other shapes
            for index, queue in enumerate(self._queues):
                self._queues[index] = deque(r for r in queue if id(r) not in taken)
        now = time.perf_counter_ns()
        for request in batch:
            request.state = RUNNING
            request.dispatch_ns = now
        self._queued -= len(batch)
        self._running += len(batch)
        self.stats.pending_gauge.dec(len(batch))
        replica = self._idle.pop()
        self._running_since[replica.index] = (now, len(batch))
        replica.submit(batch, lambda rep, outcome: self._on_done(rep, batch, rows, reason, outcome))

    def _on_done(
        self, replica: Replica, batch: list[InferenceRequest], rows: int, reason: str, outcome: BatchOutcome
    ) -> None:
        if replica.alive and replica in self._replicas:  # a lost replica never runs another batch
            self._idle.append(replica)
        self._running -= len(batch)
        now = time.perf_counter_ns()
        started, _ = self._running_since.pop(replica.index, (now, 0))
        wall_ns = (now - started) / len(batch)
        self._service_ns = wall_ns if not self._service_ns else 0.8 * self._service_ns + 0.2 * wall_ns
        t = outcome.timings
        succeeded = sum(not isinstance(result, Exception) for result in outcome.results)
        # One run of the whole batch, or (after a failure) one more run per request: count those that worked.
        successful_executions = (1 if succeeded else 0) if t.executions <= 1 else succeeded
        self.stats.record_execution(rows, t.input_ns, t.infer_ns, t.output_ns, successful_executions, reason)
        self.stats.record_replica_busy(replica.device, replica.index, t.input_ns + t.infer_ns + t.output_ns)
        for request, result in zip(batch, outcome.results, strict=True):
            if request.timer is not None:
                request.timer.cancel()
            if request.state != RUNNING:
                continue  # cancelled or expired while running: already answered
            request.state = DONE
            if isinstance(result, Exception):
                request.future.set_exception(result)
            else:
                self.stats.record_inference(
                    request.rows, request.dispatch_ns - request.arrival_ns, t.input_ns, t.infer_ns, t.output_ns
                )
                request.future.set_result(result)
        self._maybe_idle()
        self._schedule()

    # --------------------------------------------------------- lifecycle

    def _maybe_idle(self) -> None:
        if self._queued == 0 and self._running == 0:
            self._idle_event.set()

    def stop_accepting(self) -> None:
        self._accepting = False

    def replace_replica(self, old: Replica, new: Replica) -> None:
        """Put ``new`` in the place of a lost replica and give it queued work."""
        self._replicas = [new if replica is old else replica for replica in self._replicas]
        if old in self._idle:
            self._idle.remove(old)
        self._idle.append(new)
        self._schedule()

    async def drain(self) -> None:
        """Stop taking requests and wait until everything accepted has been answered."""
        self._accepting = False
        self._schedule()
        await self._idle_event.wait()

    def close(self, why: str = "") -> None:
        """Fail anything still queued and dispatch nothing more (used only when a drain timed out)."""
        self._accepting = False
        self._idle.clear()
        why = why or f"model {self.label} was unloaded"
        for queue in self._queues:
            for request in queue:
                if request.state == QUEUED:
                    self._leave_queue(request, CANCELLED)
                    if request.future is not None and not request.future.done():
                        request.future.set_exception(
                            ModelUnavailableError(f"{why} before this request ran (grace period over)")
                        )
            queue.clear()
        if self._delay_timer is not None:
            self._delay_timer.cancel()
