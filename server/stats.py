"""Per model-version statistics: Triton's ModelStatistics numbers and Prometheus metrics.

Both views are fed from the same events on the event loop (no locks needed for
the Triton counters); ``tensorwire_*`` metric names and the model/version
labels are ``model`` and ``version`` (plus ``device``/``replica`` for replicas).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tensorwire.proto import inference_pb2 as pb

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


class Metrics:
    """The Prometheus metric families of one server (own registry: no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        r = self.registry
        self.success = Counter(
            "tensorwire_request_success", "Requests answered successfully", labels, registry=r
        )
        self.failure = Counter(
            "tensorwire_request_failure", "Requests that failed, by reason", (*labels, "reason"), registry=r
        )
        self.inferences = Counter(
            "tensorwire_inference_count", "Samples (batch rows) inferred", labels, registry=r
        )
        self.executions = Counter(
            "tensorwire_execution_count",
            "Model executions; inference_count / execution_count is the average batch",
            labels,
            registry=r,
        )
        self.pending = Gauge(
            "tensorwire_pending_requests", "Requests queued, not yet running", labels, registry=r
        )
        self.request_duration = Histogram(
            "tensorwire_request_duration_seconds",
            "Request time from arrival to answer",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "tensorwire_queue_duration_seconds",
            "Time spent queued before execution",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_duration = Histogram(
            "tensorwire_compute_duration_seconds",
            "Execution time of a batch (input+infer+output)",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "tensorwire_batch_size", "Rows per execution", labels, buckets=_BATCH_BUCKETS, registry=r
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


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


class ModelVersionStats:
    """Counters for one model version; every method runs on the event loop."""

    def __init__(self, metrics: Metrics, model: str, version: int) -> None:
        self.model, self.version = model, str(version)
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchDurations] = defaultdict(BatchDurations)
        self.flush_reasons: dict[str, int] = defaultdict(int)
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
        self._m_flushes = {}  # reason -> labelled child; labels() costs microseconds on the hot path
        self._m_failures = {}
        self._m_busy = {}

    def record_batch(
        self,
        rows: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        executions: int,
        reason: str,
    ) -> None:
        self.inference_count += rows
        self.execution_count += executions
        self.last_inference_ms = int(time.time() * 1000)
        for duration, ns in (
            (self.compute_input, input_ns),
            (self.compute_infer, infer_ns),
            (self.compute_output, output_ns),
        ):
            duration.add(ns * requests, requests)
        batch = self.batches[rows]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        self.flush_reasons[reason] += 1
        self._m_inferences.inc(rows)
        self._m_executions.inc(executions)
        self._m_compute.observe((input_ns + infer_ns + output_ns) / 1e9)
        self._m_batch.observe(rows)
        flushes = self._m_flushes.get(reason)
        if flushes is None:
            flushes = self._m_flushes[reason] = self._metrics.flushes.labels(self.model, self.version, reason)
        flushes.inc()

    def record_queue(self, ns: int) -> None:
        self.queue.add(ns)
        self._m_queue.observe(ns / 1e9)

    def record_success(self, ns: int) -> None:
        self.success.add(ns)
        self._m_success.inc()
        self._m_request.observe(ns / 1e9)

    def record_failure(self, ns: int, reason: str) -> None:
        self.fail.add(ns)
        failures = self._m_failures.get(reason)
        if failures is None:
            failures = self._m_failures[reason] = self._metrics.failure.labels(
                self.model, self.version, reason
            )
        failures.inc()

    def record_replica_busy(self, device: str, replica: int, ns: int) -> None:
        busy = self._m_busy.get(replica)
        if busy is None:
            busy = self._m_busy[replica] = self._metrics.replica_busy.labels(
                self.model, self.version, device, str(replica)
            )
        busy.inc(ns / 1e9)

    def to_proto(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.model,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=d.compute_input.to_proto(),
                    compute_infer=d.compute_infer.to_proto(),
                    compute_output=d.compute_output.to_proto(),
                )
                for size, d in sorted(self.batches.items())
            ],
        )
