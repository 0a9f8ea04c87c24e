"""The dynamic batcher: one per model version, living on the event loop.

Work-conserving: whenever a replica is free and work is queued, a batch goes out at once, unless waiting
(at most ``max_queue_delay_us`` past the oldest request) is expected to pay. While every replica is busy,
requests pile up and the next batch takes all that fits. So low load sees batch ≈ 1 with no added latency,
and high load sees large batches with no timer in the way.

When a batch goes out:

- A request that arrives while a replica is free and the event loop has nothing else ready to run in
  this iteration is alone: its batch is formed and, when it runs inline (see below), run right there, in
  ``submit``, with no callback round trip. Otherwise the batch is formed at the end of the loop iteration
  (one ``call_soon`` per batch), so requests that arrive together share it.
- Waiting for companions pays in two cases. The configured one (Triton's): ``preferred_batch_sizes`` and
  an arrival rate that will reach the next preferred size within ``max_queue_delay_us``. And an adaptive
  one: when requests arrive faster than the fixed cost of one batch (the measured hand-off to the
  replica's thread plus the model's fixed run time), each batch of one would pay that cost alone, so the
  batch waits for companions, up to that fixed cost (never more than ``max_queue_delay_us``) past its
  oldest request. Both the smoothed gap between arrivals and the latest gap must be below the fixed cost,
  so a lone request, or the first after a pause, never waits.
- Where a batch runs: on the replica's thread, or on the event loop itself when the model was measured
  to run it faster than the hand-off would take (``Replica.inline``; see ``tensorwire.server.handoff``).

Queues: one lane per priority level and per non-batch shape (requests share a batch only when their
non-batch shapes agree), each a deque in arrival order. Forming a batch touches only the requests it takes
(and any cancelled ones ahead of them): no step is O(queue).

Padding (models whose config gives inputs a ``padding``): the padded axis is left out of the lane key, so
requests of every length share a lane, and a batch is the lane's oldest request plus the queued companions
closest to it in length (of the first few hundred at most) that keep the batch's padding within
``max_padded_share`` of its padded inputs' elements: one long request never inflates many short ones, and
a request that does not fit now is the oldest, and so in a batch, soon. The padding itself is done by the
replica's ``Executor`` (in its thread); the batcher counts the padded elements of each batch it sends.

Deadlines are enforced by timers, not when a batch finishes: an expired queued request is answered
DEADLINE_EXCEEDED and is never executed; a cancelled one is dropped from the queue and never executed.
Only requests that carry a deadline get a timer.

Statistics: the batcher reports each batch once (``ModelVersionStats.record_batch``: the run, and the
requests of it that got their outputs); how a request ended (success or failure with its reason) is the
front-end's to count, once. Queued requests are counted in the version's counters (the pending gauge).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
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

#: Weight of the newest sample in the moving averages of arrival gaps and service times.
RATE_WEIGHT = 0.2

_arrivals = itertools.count()  # arrival order across lanes (FIFO between shapes of one priority level)


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
        "seq",
        "padded",
    )
    padded: tuple[tuple[int, int], ...]

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
        self.seq = 0
        # ``padded`` (models that pad only; unset otherwise, so other requests pay nothing for it): per padded
        # input, (its length on the padded axis, elements per unit of that length in one row). Set by the batcher.


def shape_key(inputs: dict[str, np.ndarray], batched: bool) -> tuple:
    """Requests may share a batch only when their non-batch shapes agree."""
    return tuple((name, array.shape[1:] if batched else array.shape) for name, array in inputs.items())


def padded_key(key: tuple, axes: dict[str, int]) -> tuple:
    """The lane key of a request to a model that pads: its ``shape_key`` with each padded input's padded
    axis (``axes``: name -> index into the non-batch shape) set to -1, so that requests differing only in
    padded lengths share a lane."""
    out = []
    for name, dims in key:
        axis = axes.get(name)
        if axis is not None:
            dims = (*dims[:axis], -1, *dims[axis + 1 :])
        out.append((name, dims))
    return tuple(out)


def padding_of(batch: Sequence[InferenceRequest]) -> tuple[int, int]:
    """(padding elements the batch needs, elements of its padded inputs once padded, padding included)."""
    rows = sum(request.rows for request in batch)
    real = padded = 0
    first = batch[0].padded or ()
    for j in range(len(first)):
        unit = first[j][1]
        longest = max(request.padded[j][0] for request in batch)
        padded += rows * longest * unit
        real += sum(request.rows * request.padded[j][0] for request in batch) * unit
    return padded - real, padded


def loop_is_quiet(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop has no other callback ready to run in this iteration (so no request that arrived
    together with the current one is about to be submitted).

    Reads the ready queue of asyncio's own loops (``BaseEventLoop._ready``: a private attribute, checked
    for); a loop without one (uvloop) is never called quiet, so batches there always form at the end of
    the iteration, as they did before this shortcut existed.
    """
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


class _Lane:
    """The queued requests of one priority level and one non-batch shape, in arrival order.

    Cancelled and expired requests stay in the deque until they reach its front (``live`` counts the
    others), so leaving the queue is O(1)."""

    __slots__ = ("requests", "live")

    def __init__(self) -> None:
        self.requests: deque[InferenceRequest] = deque()
        self.live = 0

    def head(self) -> InferenceRequest | None:
        """The oldest live request (dead ones in front are dropped), or None."""
        requests = self.requests
        while requests and requests[0].state is not QUEUED:
            requests.popleft()
        return requests[0] if requests else None


class DynamicBatcher:
    """Queues, forms batches and hands them to idle replicas (or runs them inline)."""

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
        self._counters = stats.counters
        self._loop = loop
        self._replicas = list(replicas)
        self._idle: list[Replica] = list(reversed(self._replicas))
        self._levels: list[dict[tuple, _Lane]] = [{} for _ in range(settings.priority_levels)]
        self._queued = 0
        self._running = 0
        self._delay_ns = settings.max_queue_delay_us * 1000
        targets = settings.preferred_batch_sizes or [self.max_batch_size]
        self._preferred = sorted(set(targets))
        self._preferred_set = set(settings.preferred_batch_sizes)
        self._delay_timer: asyncio.TimerHandle | None = None
        self._delay_expires_ns = 0
        self._running_since: dict[int, tuple[int, int]] = {}  # replica index -> (dispatch ns, requests)
        self._last_arrival_ns = 0
        self._last_gap_ns = float("inf")
        self._gap_ns = float("inf")  # moving average of the time between arrivals
        self._service_ns = 0.0  # moving average of a batch's wall time per request in it (0: none measured)
        self._accepting = True
        self._schedule_pending = False
        self._drained: asyncio.Future | None = None
        # The largest fixed cost a batch can have (ns): an arrival gap above it never makes a batch wait.
        profiles = [r.profile for r in self._replicas if r.profile is not None]
        self._overhead_bound_ns = max((p.fixed_ns + p.hop_ns for p in profiles), default=0.0)
        # Models whose config pads variable dimensions: requests of different lengths share a lane, and a
        # batch takes only companions that keep its padding within the plan's share (see _peek_padded).
        signature = getattr(self._replicas[0].executor, "signature", None) if self._replicas else None
        self._padding = plan = signature.padding if signature is not None and self.combine else None
        self._pad_axes = {} if plan is None else {p.name: p.axis for p in plan.inputs}
        self._pad_scan = max(64, 4 * self.max_batch_size)  # queued requests one batch formation looks at
        self._pad_left_out = False  # the last padded batch formed left queued requests out (padding bound, rows)
        if plan is not None:
            self._counters.pads = True  # the padding series are exported for this version

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
        (the model failed), ModelUnavailableError (unloaded past its grace period). A request that ran
        inline (see the module docstring) comes back with its future already resolved.
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
        loop = self._loop
        future = request.future = loop.create_future()
        if request.deadline is not None:
            request.timer = loop.call_at(request.deadline, self._expire, request)
        request.seq = next(_arrivals)
        if self._padding is not None:
            self._pad_request(request)
        lanes = self._levels[request.priority]
        lane = lanes.get(request.shape_key)
        if lane is None:
            lane = lanes[request.shape_key] = _Lane()
        lane.requests.append(request)
        lane.live += 1
        self._queued += 1
        self._counters.pending += 1
        now = request.arrival_ns
        if self._last_arrival_ns:
            gap = self._last_gap_ns = now - self._last_arrival_ns
            self._gap_ns = gap if self._gap_ns == float("inf") else self._gap_ns + (gap - self._gap_ns) * RATE_WEIGHT
        self._last_arrival_ns = now
        if self._idle and not self._schedule_pending:
            replica = self._idle[-1]
            if replica.profile is not None and loop_is_quiet(loop) and replica.inline(request.rows):
                # Alone in this loop iteration, and cheaper to run than to hand over: go now.
                if self._queued == 1 and lane.live == 1:  # the only request queued: it is the batch
                    reason = self._flush_reason([request], request.rows)
                    if reason is not None:
                        lane.requests.clear()  # anything else in it was cancelled or expired
                        lane.live = 0
                        self._dispatch([request], request.rows, reason)
                else:
                    self._schedule()
            else:
                # Form the batch at the end of this loop iteration: requests that arrive in the
                # same iteration go out together (one callback per batch, no timer).
                self._schedule_pending = True
                loop.call_soon(self._deferred_schedule)
        return future

    def _pad_request(self, request: InferenceRequest) -> None:
        """Give a request to a padding model its lane key (padded lengths left out) and its padded lengths."""
        axes = self._pad_axes
        padded = []
        for name, axis in axes.items():
            shape = request.inputs[name].shape[1:]
            padded.append((shape[axis], math.prod(shape[:axis] + shape[axis + 1 :])))
        request.padded = tuple(padded)
        request.shape_key = padded_key(request.shape_key, axes)

    def _deferred_schedule(self) -> None:
        self._schedule_pending = False
        self._schedule()

    def cancel(self, request: InferenceRequest) -> None:
        """The caller went away: drop a queued request (it will never run)."""
        if request.state is QUEUED:
            self._leave_queue(request, CANCELLED)
        elif request.state is RUNNING:
            request.state = CANCELLED  # the result, when it comes, is dropped

    def _expire(self, request: InferenceRequest) -> None:
        waited_ms = (time.perf_counter_ns() - request.arrival_ns) / 1e6
        if request.state is QUEUED:
            self._leave_queue(request, EXPIRED)
            message = f"deadline passed after {waited_ms:.1f} ms in the queue of {self.label}; the request was not run"
        elif request.state is RUNNING:
            request.state = EXPIRED
            message = f"deadline passed after {waited_ms:.1f} ms while {self.label} was running the request"
        else:
            return
        if request.future is not None and not request.future.done():
            request.future.set_exception(DeadlineExceededError(message))

    def _leave_queue(self, request: InferenceRequest, state: str) -> None:
        request.state = state
        self._levels[request.priority][request.shape_key].live -= 1
        self._queued -= 1
        self._counters.pending -= 1
        if request.timer is not None and state is not EXPIRED:
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
            lane = self._next_lane()
            if lane is None:
                return
            batch, rows, taken = self._peek(lane)
            reason = self._flush_reason(batch, rows)
            if reason is None:
                if not self._pad_left_out:
                    return  # waiting for companions; the delay timer calls back
                # Queued requests that cannot join this batch (padding bound, rows): waiting would leave the
                # replica idle with work queued; they form the next batch.
                reason = "replica_idle"
            for _ in range(taken):
                lane.requests.popleft()
            lane.live -= len(batch)
            self._dispatch(batch, rows, reason)

    def _next_lane(self) -> _Lane | None:
        """The lane of the next batch: the highest priority level with work, and in it the shape whose
        oldest request arrived first. Empty lanes are dropped (shapes come and go)."""
        for lanes in self._levels:
            best, best_seq = None, 0
            empty = []
            for key, lane in lanes.items():
                head = lane.head() if lane.live else None
                if head is None:
                    if not lane.requests:
                        empty.append(key)
                    continue
                if best is None or head.seq < best_seq:
                    best, best_seq = lane, head.seq
            for key in empty:
                del lanes[key]
            if best is not None:
                return best
        return None

    def _peek(self, lane: _Lane) -> tuple[list[InferenceRequest], int, int]:
        """The next batch from ``lane``: FIFO up to max_batch_size rows (one request when not combining).
        Returns (requests, rows, how many deque entries it spans, cancelled ones included)."""
        if self._padding is not None:
            return self._peek_padded(lane)
        batch: list[InferenceRequest] = []
        rows = taken = 0
        limit = self.max_batch_size
        for request in lane.requests:
            if request.state is not QUEUED:
                taken += 1
                continue
            if batch and (rows + request.rows > limit or not self.combine):
                break
            batch.append(request)
            rows += request.rows
            taken += 1
            if rows >= limit:
                break
        return batch, rows, taken

    def _peek_padded(self, lane: _Lane) -> tuple[list[InferenceRequest], int, int]:
        """The next batch of a model that pads: the lane's oldest request and, closest in length first, the
        queued companions that keep the batch within max_batch_size rows and its padding within the share.

        Looks at the first ``_pad_scan`` queued requests of the lane (never the whole queue). The oldest
        request always goes, so every request is the oldest one day: none is passed over for ever. Returns
        (requests, rows, how many leading deque entries are taken or dead), like ``_peek``; chosen requests
        further back stay in the deque, marked running, until they reach its front."""
        head = None
        candidates: list[InferenceRequest] = []
        for request in lane.requests:
            if request.state is not QUEUED:
                continue
            if head is None:
                head = request
            else:
                candidates.append(request)
                if len(candidates) >= self._pad_scan:
                    break
        self._pad_left_out = False
        if head is None:
            return [], 0, 0
        batch = [head]
        rows = head.rows
        limit = self.max_batch_size
        inputs = range(len(head.padded))
        longest = [head.padded[j][0] for j in inputs]
        units = [head.padded[j][1] for j in inputs]
        real = [head.rows * longest[j] for j in inputs]
        allowed = self._padding.max_share
        if rows < limit and candidates:
            size = sum(length * unit for length, unit in head.padded)
            candidates.sort(key=lambda r: abs(sum(length * unit for length, unit in r.padded) - size))
            for request in candidates:
                new_rows = rows + request.rows
                if new_rows > limit:
                    self._pad_left_out = True
                    continue
                new_longest = [max(longest[j], request.padded[j][0]) for j in inputs]
                new_real = [real[j] + request.rows * request.padded[j][0] for j in inputs]
                total = sum(new_rows * new_longest[j] * units[j] for j in inputs)
                wasted = total - sum(new_real[j] * units[j] for j in inputs)
                if wasted > allowed * total:
                    self._pad_left_out = True
                    continue
                batch.append(request)
                rows, longest, real = new_rows, new_longest, new_real
                if rows >= limit:
                    break
        chosen = {id(request) for request in batch}
        taken = 0
        for request in lane.requests:
            if request.state is not QUEUED or id(request) in chosen:
                taken += 1
            else:
                break
        return batch, rows, taken

    def _flush_reason(self, batch: list[InferenceRequest], rows: int) -> str | None:
        """Why the batch goes now, or None to wait for companions (the delay timer is armed)."""
        if not self.combine:
            return "replica_idle"
        if rows >= self.max_batch_size:
            return "full"
        if rows in self._preferred_set:
            return "preferred"
        if self._delay_ns == 0 or rows >= self._preferred[-1]:
            return "replica_idle"
        # The arrival gap both rules go by: the smoothed one, or the latest when longer, so that a request
        # arriving after a pause never waits for companions that a burst before the pause promised.
        gap = max(self._gap_ns, self._last_gap_ns)
        if gap == float("inf"):
            return "replica_idle"  # no arrival rate measured yet: nothing to wait for
        now = time.perf_counter_ns()
        oldest = batch[0].arrival_ns
        expires = oldest + self._delay_ns
        if now >= expires:
            return "delay_expired"
        # Triton's rule: wait when the arrival rate will reach the next preferred size (or, without
        # preferred sizes, max_batch_size) within max_queue_delay_us.
        target = self._preferred[bisect.bisect_right(self._preferred, rows)]
        if gap <= 0 or rows + (expires - now) / gap >= target:
            self._arm_delay_timer(expires)
            return None
        if gap >= self._overhead_bound_ns:
            return "replica_idle"  # arrivals are further apart than any batch's fixed cost
        overhead = self._batch_overhead_ns(rows)
        if gap < overhead:
            # Requests come faster than a batch's fixed cost: wait for companions, up to that cost.
            expires = min(expires, oldest + int(overhead))
            if now < expires:
                self._arm_delay_timer(expires)
                return None
            return "delay_expired"
        return "replica_idle"

    def _batch_overhead_ns(self, rows: int) -> float:
        """The fixed cost of one batch, ns: the model's run time at zero rows plus the hand-off to the
        replica's thread when the batch would not run inline (both measured at load; 0 when not measured)."""
        profile = self._idle[-1].profile if self._idle else None
        if profile is None:
            return 0.0
        return profile.fixed_ns if profile.inline(rows) else profile.fixed_ns + profile.hop_ns

    def _arm_delay_timer(self, expires_ns: int) -> None:
        if self._delay_timer is not None:
            if self._delay_expires_ns == expires_ns:
                return
            self._delay_timer.cancel()
        self._delay_expires_ns = expires_ns
        self._delay_timer = self._loop.call_later((expires_ns - time.perf_counter_ns()) / 1e9, self._on_delay_timer)

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._schedule()

    def _dispatch(self, batch: list[InferenceRequest], rows: int, reason: str) -> None:
        now = time.perf_counter_ns()
        for request in batch:
            request.state = RUNNING
            request.dispatch_ns = now
        n = len(batch)
        self._queued -= n
        self._running += n
        self._counters.pending -= n
        replica = self._idle.pop()
        self._running_since[replica.index] = (now, n)
        if self._padding is not None:
            self.stats.record_padding(*padding_of(batch))
        if replica.inline(rows):
            self._complete(replica, batch, rows, reason, replica.run_inline(batch))
        else:
            replica.submit(batch, lambda rep, outcome: self._on_done(rep, batch, rows, reason, outcome))

    def _on_done(
        self, replica: Replica, batch: list[InferenceRequest], rows: int, reason: str, outcome: BatchOutcome
    ) -> None:
        self._complete(replica, batch, rows, reason, outcome)
        self._schedule()

    def _complete(
        self, replica: Replica, batch: list[InferenceRequest], rows: int, reason: str, outcome: BatchOutcome
    ) -> None:
        """Answer a batch's requests, count it once, and give the replica back."""
        if replica.alive and replica in self._replicas:  # a lost replica never runs another batch
            self._idle.append(replica)
        n = len(batch)
        self._running -= n
        now = time.perf_counter_ns()
        started, _ = self._running_since.pop(replica.index, (now, 0))
        wall_ns = (now - started) / n
        self._service_ns = wall_ns if not self._service_ns else self._service_ns + (wall_ns - self._service_ns) * 0.2
        t = outcome.timings
        succeeded: list[tuple[int, int]] = []
        worked = 0  # results that are outputs, whether or not their caller still waits
        for request, result in zip(batch, outcome.results, strict=True):
            failed = isinstance(result, Exception)
            if not failed:
                worked += 1
            if request.timer is not None:
                request.timer.cancel()
            if request.state is not RUNNING:
                continue  # cancelled or expired while running: already answered
            request.state = DONE
            if failed:
                request.future.set_exception(result)
            else:
                succeeded.append((request.rows, request.dispatch_ns - request.arrival_ns))
                request.future.set_result(result)
        # One run of the whole batch, or (after a failure) one more run per request: count those that worked.
        executions = (1 if worked else 0) if t.executions <= 1 else worked
        self.stats.record_batch(
            rows, reason, t.input_ns, t.infer_ns, t.output_ns, executions, replica.busy_key, succeeded
        )
        if self._drained is not None:
            self._maybe_idle()

    # --------------------------------------------------------- lifecycle

    def _maybe_idle(self) -> None:
        if self._queued == 0 and self._running == 0 and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

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
        if self._drained is None:
            self._drained = self._loop.create_future()
        self._schedule()
        self._maybe_idle()
        await asyncio.shield(self._drained)

    def close(self, why: str = "") -> None:
        """Fail anything still queued and dispatch nothing more (used only when a drain timed out)."""
        self._accepting = False
        self._idle.clear()
        why = why or f"model {self.label} was unloaded"
        for lanes in self._levels:
            for lane in lanes.values():
                for request in lane.requests:
                    if request.state is QUEUED:
                        self._leave_queue(request, CANCELLED)
                        if request.future is not None and not request.future.done():
                            request.future.set_exception(
                                ModelUnavailableError(f"{why} before this request ran (grace period over)")
                            )
                lane.requests.clear()
            lanes.clear()
        if self._delay_timer is not None:
            self._delay_timer.cancel()
