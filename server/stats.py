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
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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


class Buckets:
    """A Prometheus histogram kept as plain Python numbers on the event loop and exported at scrape time.

    ``observe`` costs one C ``bisect`` and two additions: 0.14 µs, where prometheus-client 0.26's
    ``Histogram.observe`` walks the bounds in Python under two locks: 0.74 µs (timeit on the 2-core
    development machine; a ``Counter.inc`` costs 0.36 µs). ``counts[i]`` holds the observations
    ``<= bounds[i]`` and above ``bounds[i-1]``; the last slot holds those above every bound (``+Inf``).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' ``le`` buckets (cumulative, ``+Inf`` last), from a snapshot of the counts."""
        counts = list(self.counts)  # one C copy: the loop may be adding while a scrape reads
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), counts, strict=True):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets


@dataclass
class BatchDurations:
    """Compute durations of every batch of one size (Triton's InferBatchStatistics)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionCounters:
    """Every number of one (model, version), shared by every load of that version: Triton's
    ModelStatistics and the Prometheus series (read at scrape time by ``VersionCollector``)."""

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
    pending: int = 0  # requests queued in a batcher, not yet running
    request_duration_s: Buckets = field(default_factory=lambda: Buckets(_LATENCY_BUCKETS))
    queue_duration_s: Buckets = field(default_factory=lambda: Buckets(_LATENCY_BUCKETS))
    compute_duration_s: Buckets = field(default_factory=lambda: Buckets(_LATENCY_BUCKETS))
    batch_rows: Buckets = field(default_factory=lambda: Buckets(_BATCH_BUCKETS))
    busy_ns: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))  # (device, replica)
    pads: bool = False  # the model pads variable dimensions: the padding series below are exported
    padding_elements: int = 0  # elements of padding added to batches
    padded_input_elements: int = 0  # elements of padded inputs in batches, padding included


#: The per-version families: (name, type, help, extra label). Names and meanings are the public contract
#: (dashboards and alerts query them); ``VersionCollector`` builds them from ``VersionCounters``.
VERSION_FAMILIES: tuple[tuple[str, str, str, str], ...] = (
    ("tensorwire_request_success", "counter", "Inference requests answered successfully", ""),
    (
        "tensorwire_request_failure",
        "counter",
        "Inference requests that reached a model version and failed, by reason",
        "reason",
    ),
    ("tensorwire_inference_count", "counter", "Rows (batch samples) of successful requests", ""),
    (
        "tensorwire_execution_count",
        "counter",
        "Successful model executions; inference_count / execution_count is the average batch",
        "",
    ),
    ("tensorwire_pending_requests", "gauge", "Requests queued, not yet running", ""),
    (
        "tensorwire_request_duration_seconds",
        "histogram",
        "Time from arrival to answer of successful requests",
        "",
    ),
    (
        "tensorwire_queue_duration_seconds",
        "histogram",
        "Time successful requests spent queued before execution",
        "",
    ),
    (
        "tensorwire_compute_duration_seconds",
        "histogram",
        "Execution time of every batch run (input+infer+output), failed ones included",
        "",
    ),
    ("tensorwire_batch_size", "histogram", "Rows per batch run, failed ones included", ""),
    ("tensorwire_batch_flush", "counter", "Batches dispatched, by why they were dispatched", "reason"),
    ("tensorwire_replica_busy_seconds", "counter", "Time replicas spent executing", "device,replica"),
    (
        "tensorwire_padding_elements",
        "counter",
        "Elements of padding added to batches of requests of different lengths (models that pad only)",
        "",
    ),
    (
        "tensorwire_padded_input_elements",
        "counter",
        "Elements of padded inputs in the batches sent, padding included; padding_elements / this is the padded share",
        "",
    ),
)


class VersionCollector(Collector):
    """Builds the per-version families from the counters at scrape time (Prometheus' HTTP thread).

    The counters are plain Python numbers changed only on the event loop; a scrape reads a snapshot of
    each dict (a C-level copy under the GIL), so it never sees a dict change size mid-iteration. A scrape
    may see one request's success before its duration histogram has it: numbers a few µs apart, as any
    scrape of a live server is.
    """

    def __init__(self, counters: dict[tuple[str, str], VersionCounters]) -> None:
        self._counters = counters

    def collect(self) -> Iterable[Metric]:
        versions = list(self._counters.items())
        families: dict[str, Metric] = {}
        for name, kind, text, extra in VERSION_FAMILIES:
            labels = ["model", "version", *(extra.split(",") if extra else [])]
            make = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
            families[name] = make[kind](name, text, labels=labels)
        f = families
        for (model, version), c in versions:
            key = [model, version]
            f["tensorwire_request_success"].add_metric(key, c.success.count)
            for reason, count in dict(c.failures).items():
                f["tensorwire_request_failure"].add_metric([*key, reason], count)
            f["tensorwire_inference_count"].add_metric(key, c.inference_count)
            f["tensorwire_execution_count"].add_metric(key, c.execution_count)
            f["tensorwire_pending_requests"].add_metric(key, c.pending)
            for name, buckets in (
                ("tensorwire_request_duration_seconds", c.request_duration_s),
                ("tensorwire_queue_duration_seconds", c.queue_duration_s),
                ("tensorwire_compute_duration_seconds", c.compute_duration_s),
                ("tensorwire_batch_size", c.batch_rows),
            ):
                f[name].add_metric(key, buckets.cumulative(), buckets.total)
            for reason, count in dict(c.flush_reasons).items():
                f["tensorwire_batch_flush"].add_metric([*key, reason], count)
            for (device, replica), ns in dict(c.busy_ns).items():
                f["tensorwire_replica_busy_seconds"].add_metric([*key, device, replica], ns / 1e9)
            if c.pads:
                f["tensorwire_padding_elements"].add_metric(key, c.padding_elements)
                f["tensorwire_padded_input_elements"].add_metric(key, c.padded_input_elements)
        return families.values()


class Metrics:
    """The Prometheus registry of one server (own registry: no global state) and the per-version
    counters behind both ModelStatistics and the per-version ``tensorwire_*`` series.

    Per-version numbers are aggregated in plain Python on the event loop (``VersionCounters``) and turned
    into Prometheus families only when scraped (``VersionCollector``): a request costs a few additions
    and no lock. Besides those it registers ``tensorwire_request_refused`` (refusals before a version
    resolved), the in-flight memory gauges, prometheus-client's process collector
    (``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_open_fds``, ... on Linux)
    and a GPU collector (``tensorwire_gpu_*`` per device through NVML; no GPU or no NVML: no series).
    """

    def __init__(self, gpu: bool = True) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.refused = Counter(
            "tensorwire_request_refused",
            "Calls refused before a model version resolved (no model label: the name is the caller's), "
            "by method and reason",
            ("method", "reason"),
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
        self._counters: dict[tuple[str, str], VersionCounters] = {}
        r.register(VersionCollector(self._counters))
        ProcessCollector(registry=r)
        if gpu:
            r.register(GpuCollector())
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
        for key in gone:
            del self._counters[key]
        return gone


class ModelVersionStats:
    """The statistics of one loaded ModelVersion: a view onto its (model, version) counters.

    The batcher reports each batch once (``record_batch``: the run, and every request of it that got its
    outputs); the front-end reports how each request ended (``begin``, then ``record_success`` or
    ``record_failure`` exactly once). Everything is a few additions on the event loop; Prometheus reads
    the same numbers at scrape time.
    """

    def __init__(self, metrics: Metrics, model: str, version: int | str) -> None:
        self.model, self.version = model, str(version)
        self.counters = metrics.version_counters(model, self.version)

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

    def record_batch(
        self,
        rows: int,
        reason: str,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        successful_executions: int,
        replica: tuple[str, str],
        succeeded: list[tuple[int, int]],
    ) -> None:
        """One dispatched batch of ``rows`` rows has run (flushed for ``reason``, on ``replica``: its
        (device, index) labels; ``successful_executions`` of its runs succeeded: a batch rerun request by
        request ran several times). ``succeeded`` holds ``(rows, queue_ns)`` of each request that got its outputs:
        each is counted with its own queue time and the batch's compute durations (Triton's definitions).
        Durations are nanoseconds."""
        # Plain arithmetic, no method calls: this runs once per batch on the event loop.
        c = self.counters
        compute_ns = input_ns + infer_ns + output_ns
        c.execution_count += successful_executions
        batch = c.batches[rows]
        batch.compute_input.count += 1
        batch.compute_input.ns += input_ns
        batch.compute_infer.count += 1
        batch.compute_infer.ns += infer_ns
        batch.compute_output.count += 1
        batch.compute_output.ns += output_ns
        c.flush_reasons[reason] += 1
        c.compute_duration_s.observe(compute_ns / 1e9)
        c.batch_rows.observe(rows)
        c.busy_ns[replica] += compute_ns
        n = len(succeeded)
        if not n:
            return
        queue = c.queue_duration_s
        bounds, counts = queue.bounds, queue.counts
        queue_ns = inferences = 0
        for request_rows, waited_ns in succeeded:
            inferences += request_rows
            queue_ns += waited_ns
            counts[bisect_left(bounds, waited_ns / 1e9)] += 1
        queue.total += queue_ns / 1e9
        c.inference_count += inferences
        c.queue.count += n
        c.queue.ns += queue_ns
        c.compute_input.count += n
        c.compute_input.ns += input_ns * n
        c.compute_infer.count += n
        c.compute_infer.ns += infer_ns * n
        c.compute_output.count += n
        c.compute_output.ns += output_ns * n

    def record_padding(self, padding: int, elements: int) -> None:
        """A batch of a model that pads was sent with ``padding`` elements of padding among the ``elements``
        of its padded inputs (padding included)."""
        c = self.counters
        c.padding_elements += padding
        c.padded_input_elements += elements

    # ----------------------------------------------------- from the front-end

    def begin(self) -> None:
        """A request resolved to this version; it must end in record_success or record_failure."""
        self.counters.in_flight += 1

    def record_success(self, ns: int) -> None:
        """The request was answered successfully ``ns`` nanoseconds after it arrived."""
        c = self.counters
        c.in_flight -= 1
        c.success.count += 1
        c.success.ns += ns
        c.last_inference_ms = int(time.time() * 1000)
        c.request_duration_s.observe(ns / 1e9)

    def record_failure(self, ns: int, reason: str) -> None:
        """The request failed ``ns`` nanoseconds after it arrived; ``reason`` is a ``REASONS`` key."""
        c = self.counters
        c.in_flight -= 1
        c.fail.add(ns)
        c.failures[reason] += 1
        c.last_inference_ms = int(time.time() * 1000)

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
