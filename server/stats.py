"""Statistics: Triton's ModelStatistics numbers and the Prometheus metrics, fed by the same events.

Definitions (Triton's, from its ``ModelStatistics`` message documentation):

- ``inference_count``: rows (batch-dimension samples) of *successful* requests; a request of 8 rows adds 8.
- ``execution_count``: *successful* model executions; a batch that failed entirely does not count, a batch
  rerun request by request counts each run that succeeded. ``inference_count / execution_count`` is the
  average batch.
- ``success`` / ``fail``: every inference request that reached a model version ends in exactly one of the
  two, with its time from arrival to answer; each failure is also counted by reason (``REASONS``).
- ``queue`` and ``compute_input`` / ``compute_infer`` / ``compute_output``: successful requests only; each
  request adds the durations of the batch it ran in.
- ``batch_stats``: one entry per batch size, counting every batch the model ran, failed ones included
  (they took compute time).

Counters belong to a (model, version) pair, not to one load of it: a reload of the same version keeps
counting where it was, so ModelStatistics and the Prometheus counters never go backwards. When a version
stops being served (unloaded, or retired by a newer one) and its last request has finished,
``Metrics.retain`` drops its counters and removes its series.

Requests refused before a model version resolved (unauthenticated, malformed, unknown model or version,
model not ready, over the memory budget) carry no model label (the name is the caller's) and are counted
by ``method`` and ``reason`` in ``tensorwire_request_refused_total``. Every ``record_*`` method runs on
the event loop; Prometheus reads the families from its HTTP thread.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from tensorwire.proto import inference_pb2 as pb
from tensorwire.server.errors import (
    BackendError,
    DeadlineExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    ServingError,
)
from tensorwire.server.gpu_metrics import GpuCollector

#: The one vocabulary of failure and refusal reasons (the ``reason`` label), with the status each goes with.
REASONS: dict[str, str] = {
    "invalid_argument": "INVALID_ARGUMENT: the request's tensors or parameters are wrong",
    "malformed": "INVALID_ARGUMENT: the message is not a valid protobuf message of the method's type",
    "not_found": "NOT_FOUND: unknown model or version",
    "unauthenticated": "UNAUTHENTICATED: missing or wrong bearer token",
    "unavailable": "UNAVAILABLE: model loading or unloading, or the server draining",
    "queue_full": "RESOURCE_EXHAUSTED: the model's max_queue_size was reached",
    "memory_budget": "RESOURCE_EXHAUSTED: the server's in-flight memory budget was reached",
    "deadline_exceeded": "DEADLINE_EXCEEDED: deadline or queue timeout passed (on arrival, queued or running)",
    "cancelled": "CANCELLED: the caller went away",
    "model_error": "INTERNAL: the model failed on this request",
    "internal": "INTERNAL: a bug of ours (the traceback is in the log)",
}

_STATUS_REASONS = {
    "INVALID_ARGUMENT": "invalid_argument",
    "NOT_FOUND": "not_found",
    "UNAUTHENTICATED": "unauthenticated",
    "UNAVAILABLE": "unavailable",
    "FAILED_PRECONDITION": "unavailable",
    "DEADLINE_EXCEEDED": "deadline_exceeded",
    "CANCELLED": "cancelled",
}
_CLASS_REASONS: tuple[tuple[type[ServingError], str], ...] = (
    (QueueFullError, "queue_full"),
    (BackendError, "model_error"),
    (DeadlineExceededError, "deadline_exceeded"),
    (InvalidRequestError, "invalid_argument"),
    (ModelNotFoundError, "not_found"),
    (ModelUnavailableError, "unavailable"),
)


def failure_reason(err: ServingError) -> str:
    """The ``REASONS`` key for a core error: its class's ``reason`` attribute if it has one, else by kind."""
    reason = getattr(err, "reason", None)
    if isinstance(reason, str) and reason in REASONS:
        return reason
    for kind, name in _CLASS_REASONS:
        if isinstance(err, kind):
            return name
    return _STATUS_REASONS.get(err.status, "internal")


_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Duration:
    """A count and a cumulative duration in nanoseconds (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchDurations:
    """Compute durations of every batch of one size (Triton's InferBatchStatistics)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionCounters:
    """Triton's ModelStatistics numbers of one (model, version), shared by every load of that version."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchDurations] = field(default_factory=lambda: defaultdict(BatchDurations))
    flush_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight: int = 0  # requests between begin() and their success or failure


class Metrics:
    """The Prometheus metric families of one server (own registry: no global state) and the per-version
    counters behind ModelStatistics.

    Besides the ``tensorwire_*`` families it registers prometheus-client's process collector
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``, ... on Linux)
    and a GPU collector (``tensorwire_gpu_*`` per device through NVML; no GPU or no NVML: no series).
    """

    def __init__(self, gpu: bool = True) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        r = self.registry
        self.success = Counter(
            "tensorwire_request_success", "Inference requests answered successfully", labels, registry=r
        )
        self.failure = Counter(
            "tensorwire_request_failure",
            "Inference requests that reached a model version and failed, by reason",
            (*labels, "reason"),
            registry=r,
        )
        self.refused = Counter(
            "tensorwire_request_refused",
            "Calls refused before a model version resolved (no model label: the name is the caller's), "
            "by method and reason",
            ("method", "reason"),
            registry=r,
        )
        self.inferences = Counter(
            "tensorwire_inference_count", "Rows (batch samples) of successful requests", labels, registry=r
        )
        self.executions = Counter(
            "tensorwire_execution_count",
            "Successful model executions; inference_count / execution_count is the average batch",
            labels,
            registry=r,
        )
        self.pending = Gauge("tensorwire_pending_requests", "Requests queued, not yet running", labels, registry=r)
        self.request_duration = Histogram(
            "tensorwire_request_duration_seconds",
            "Time from arrival to answer of successful requests",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "tensorwire_queue_duration_seconds",
            "Time successful requests spent queued before execution",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "tensorwire_compute_duration_seconds",
            "Execution time of every batch run (input+infer+output), failed ones included",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tensorwire_batch_size",
            "Rows per batch run, failed ones included",
            labels,
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.flushes = Counter(
            "tensorwire_batch_flush",
            "Batches dispatched, by why they were dispatched",
            (*labels, "reason"),
            registry=r,
        )
        self.replica_busy = Counter(
            "tensorwire_replica_busy_seconds",
            "Time replicas spent executing",
            (*labels, "device", "replica"),
            registry=r,
        )
        self.inflight_bytes = Gauge(
            "tensorwire_inflight_bytes",
            "Request and response bytes held for calls in flight (counted against the memory budget)",
            registry=r,
        )
        self.inflight_bytes_limit = Gauge(
            "tensorwire_inflight_bytes_limit", "The server's in-flight memory budget in bytes", registry=r
        )
        self._versioned = (
            self.success,
            self.failure,
            self.inferences,
            self.executions,
            self.pending,
            self.request_duration,
            self.queue_duration,
            self.compute_duration,
            self.batch_size,
            self.flushes,
            self.replica_busy,
        )
        ProcessCollector(registry=r)
        if gpu:
            r.register(GpuCollector())
        self._counters: dict[tuple[str, str], VersionCounters] = {}
        self._refused_children: dict[tuple[str, str], Counter] = {}

    def watch_budget(self, in_use: Callable[[], float], limit: float) -> None:
        """Export a memory budget's use (read at scrape time) and its limit."""
        self.inflight_bytes.set_function(in_use)
        self.inflight_bytes_limit.set(limit)

    def version_counters(self, model: str, version: str) -> VersionCounters:
        """The counters of (model, version), created on first use and kept across reloads."""
        key = (model, version)
        counters = self._counters.get(key)
        if counters is None:
            counters = self._counters[key] = VersionCounters()
        return counters

    def refuse(self, method: str, reason: str) -> None:
        """Count a call refused before a model version resolved."""
        child = self._refused_children.get((method, reason))
        if child is None:
            child = self._refused_children[(method, reason)] = self.refused.labels(method, reason)
        child.inc()

    def retain(self, live: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Forget every (model, version) that is neither in ``live`` nor finishing a request: its
        ModelStatistics counters and all its Prometheus series. Returns what was forgotten."""
        keep = set(live)
        gone = [key for key, c in self._counters.items() if key not in keep and c.in_flight <= 0]
        for model, version in gone:
            del self._counters[(model, version)]
            for family in self._versioned:
                family.remove_by_labels({"model": model, "version": version})
        return gone


class ModelVersionStats:
    """The statistics of one loaded ModelVersion: a view onto its (model, version) counters.

    The batcher reports batches (``record_execution``) and successful requests (``record_inference``);
    the front-end reports how each request ended (``begin``, then ``record_success`` or ``record_failure``
    exactly once).
    """

    def __init__(self, metrics: Metrics, model: str, version: int | str) -> None:
        self.model, self.version = model, str(version)
        self.counters = metrics.version_counters(model, self.version)
        self._metrics = metrics
        labels = (model, self.version)
        self._m_success = metrics.success.labels(*labels)
        self._m_inferences = metrics.inferences.labels(*labels)
        self._m_executions = metrics.executions.labels(*labels)
        self._m_request = metrics.request_duration.labels(*labels)
        self._m_queue = metrics.queue_duration.labels(*labels)
        self._m_compute = metrics.compute_duration.labels(*labels)
        self._m_batch = metrics.batch_size.labels(*labels)
        self.pending_gauge = metrics.pending.labels(*labels)
        self._m_flushes: dict[str, Counter] = {}  # reason -> child; labels() costs microseconds per call
        self._m_failures: dict[str, Counter] = {}
        self._m_busy: dict[int, Counter] = {}

    # Read-only views, for tests and tools.
    @property
    def inference_count(self) -> int:
        return self.counters.inference_count

    @property
    def execution_count(self) -> int:
        return self.counters.execution_count

    @property
    def flush_reasons(self) -> dict[str, int]:
        return self.counters.flush_reasons

    @property
    def failures(self) -> dict[str, int]:
        return self.counters.failures

    # ------------------------------------------------------ from the batcher

    def record_execution(
        self,
        rows: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        successful_executions: int,
        reason: str,
    ) -> None:
        """One dispatched batch of ``rows`` rows has run (``successful_executions`` of its runs succeeded;
        a batch rerun request by request ran several times)."""
        c = self.counters
        c.execution_count += successful_executions
        batch = c.batches[rows]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        c.flush_reasons[reason] += 1
        if successful_executions:
            self._m_executions.inc(successful_executions)
        self._m_compute.observe((input_ns + infer_ns + output_ns) / 1e9)
        self._m_batch.observe(rows)
        flushes = self._m_flushes.get(reason)
        if flushes is None:
            flushes = self._m_flushes[reason] = self._metrics.flushes.labels(self.model, self.version, reason)
        flushes.inc()

    def record_inference(self, rows: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """A request of ``rows`` rows got its outputs: it waited ``queue_ns`` and ran in a batch that took
        the given compute durations."""
        c = self.counters
        c.inference_count += rows
        c.queue.add(queue_ns)
        c.compute_input.add(input_ns)
        c.compute_infer.add(infer_ns)
        c.compute_output.add(output_ns)
        self._m_inferences.inc(rows)
        self._m_queue.observe(queue_ns / 1e9)

    def record_replica_busy(self, device: str, replica: int, ns: int) -> None:
        busy = self._m_busy.get(replica)
        if busy is None:
            busy = self._m_busy[replica] = self._metrics.replica_busy.labels(
                self.model, self.version, device, str(replica)
            )
        busy.inc(ns / 1e9)

    # ----------------------------------------------------- from the front-end

    def begin(self) -> None:
        """A request resolved to this version; it must end in record_success or record_failure."""
        self.counters.in_flight += 1

    def record_success(self, ns: int) -> None:
        """The request was answered successfully ``ns`` nanoseconds after it arrived."""
        c = self.counters
        c.in_flight -= 1
        c.success.add(ns)
        c.last_inference_ms = int(time.time() * 1000)
        self._m_success.inc()
        self._m_request.observe(ns / 1e9)

    def record_failure(self, ns: int, reason: str) -> None:
        """The request failed ``ns`` nanoseconds after it arrived; ``reason`` is a ``REASONS`` key."""
        c = self.counters
        c.in_flight -= 1
        c.fail.add(ns)
        c.failures[reason] += 1
        c.last_inference_ms = int(time.time() * 1000)
        failures = self._m_failures.get(reason)
        if failures is None:
            failures = self._m_failures[reason] = self._metrics.failure.labels(self.model, self.version, reason)
        failures.inc()

    def to_proto(self) -> pb.ModelStatistics:
        c = self.counters
        return pb.ModelStatistics(
            name=self.model,
            version=self.version,
            last_inference=c.last_inference_ms,
            inference_count=c.inference_count,
            execution_count=c.execution_count,
            inference_stats=pb.InferStatistics(
                success=c.success.to_proto(),
                fail=c.fail.to_proto(),
                queue=c.queue.to_proto(),
                compute_input=c.compute_input.to_proto(),
                compute_infer=c.compute_infer.to_proto(),
                compute_output=c.compute_output.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=d.compute_input.to_proto(),
                    compute_infer=d.compute_infer.to_proto(),
                    compute_output=d.compute_output.to_proto(),
                )
                for size, d in sorted(c.batches.items())
            ],
        )
