"""Numbers for the closed-loop benchmark: windows, stability, percentiles, server-side deltas, CPU.

Pure functions and small records, no network: unit-testable with made-up data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)


def percentiles_ms(latencies_s: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99, mean and max of latencies given in seconds, in milliseconds (None when empty)."""
    values = np.asarray(latencies_s, dtype=np.float64) * 1e3
    keys = [f"latency_p{q}_ms" for q in PERCENTILES] + ["latency_mean_ms", "latency_max_ms"]
    if values.size == 0:
        return dict.fromkeys(keys)
    p = np.percentile(values, PERCENTILES)  # linear interpolation: ordered by construction
    return dict(zip(keys, [*map(float, p), float(values.mean()), float(values.max())], strict=True))


def is_stable(values: Sequence[float], pct: float) -> bool:
    """Whether every value lies within ±pct % of their mean (all zeros: stable; empty: not)."""
    if not values:
        return False
    mean = sum(values) / len(values)
    if mean == 0:
        return all(v == 0 for v in values)
    return all(abs(v - mean) <= mean * pct / 100.0 for v in values)


def spread_pct(values: Sequence[float]) -> float | None:
    """The largest deviation from the mean, in % of the mean (None when undefined)."""
    if not values:
        return None
    mean = sum(values) / len(values)
    if mean == 0:
        return None
    return max(abs(v - mean) for v in values) / mean * 100.0


# --------------------------------------------------------------------------- server statistics


@dataclass(frozen=True)
class ServerCounters:
    """One model's cumulative ModelStatistics counters (all its versions summed)."""

    inference_count: int = 0
    execution_count: int = 0
    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0  # requests that were computed (compute_infer.count)
    compute_ns: int = 0  # compute_input + compute_infer + compute_output, summed per request

    @classmethod
    def from_response(cls, response, model: str) -> ServerCounters:
        """From a ``ModelStatisticsResponse`` (Triton's message; other versions of the name are summed)."""
        totals = dict.fromkeys(cls.__dataclass_fields__, 0)
        for stats in response.model_stats:
            if stats.name != model:
                continue
            s = stats.inference_stats
            totals["inference_count"] += stats.inference_count
            totals["execution_count"] += stats.execution_count
            totals["success_count"] += s.success.count
            totals["success_ns"] += s.success.ns
            totals["fail_count"] += s.fail.count
            totals["queue_count"] += s.queue.count
            totals["queue_ns"] += s.queue.ns
            totals["compute_count"] += s.compute_infer.count
            totals["compute_ns"] += s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns
        return cls(**totals)


def server_delta(before: ServerCounters | None, after: ServerCounters | None) -> dict[str, float | int | None]:
    """Server-side view of a measurement: average batch and where a request's time went (µs).

    ``server_avg_batch`` = Δinference_count / Δexecution_count (rows per model execution);
    ``server_queue_us`` / ``server_compute_us`` / ``server_request_us``: mean per request of the
    queue wait, the batch's compute (input + infer + output) and the whole server-side request.
    """
    keys = (
        "server_requests",
        "server_inferences",
        "server_executions",
        "server_avg_batch",
        "server_queue_us",
        "server_compute_us",
        "server_request_us",
        "server_failures",
    )
    if before is None or after is None:
        return dict.fromkeys(keys)
    d = {k: getattr(after, k) - getattr(before, k) for k in ServerCounters.__dataclass_fields__}

    def per(ns: int, count: int) -> float | None:
        return ns / count / 1e3 if count > 0 else None

    return {
        "server_requests": d["success_count"],
        "server_inferences": d["inference_count"],
        "server_executions": d["execution_count"],
        "server_avg_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] > 0 else None,
        "server_queue_us": per(d["queue_ns"], d["queue_count"]),
        "server_compute_us": per(d["compute_ns"], d["compute_count"]),
        "server_request_us": per(d["success_ns"], d["success_count"]),
        "server_failures": d["fail_count"],
    }


# --------------------------------------------------------------------------- CPU (psutil)


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` and its live descendants (None when it is gone).

    Descendants count so that a server with worker processes is measured whole; a child that has
    already exited is not counted (its time is lost to us).
    """
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for index, process in enumerate(processes):
        try:
            times = process.cpu_times()
        except psutil.Error:
            if index == 0:
                return None
            continue
        total += times.user + times.system
    return total


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def reaped_children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for (getrusage's CHILDREN).

    The difference across a ``subprocess.run`` is what that command used, all its processes together.
    """
    import psutil

    times = psutil.Process().cpu_times()
    return times.children_user + times.children_system


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
