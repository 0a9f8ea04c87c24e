"""Triton's perf_analyzer as a building block: one measurement, one or several processes, read from its CSV report.

    spec = PerfAnalyzerRun("identity", concurrency=64, streaming=True)
    row = run(spec, server, inputs=Path("perf_inputs/identity.json"), out_dir=Path(".cache/pa"))

The binary comes from ``loadtest/perf_analyzer.sh`` (see there for why). Each process writes its CSV
report (``-f``); that report is the only thing read from perf_analyzer (its stdout goes to a log file
for people). What the CSV lacks comes from elsewhere, measured over the whole run (warm-up and every
trial, not only perf_analyzer's final window):

- average batch: the server's own ModelStatistics (Δinference_count / Δexecution_count), when the
  server has the statistics extension (the bare baseline server does not);
- server CPU: the server's process tree (psutil) over the run's wall time, in cores, and per request as
  cores ÷ the measured throughput (which assumes the rate was steady over the run);
- perf_analyzer's own CPU: the CPU of this process's reaped children over the run (all its processes).

Several processes (``processes=N``) start together, each at ``concurrency``, against the same URL:
throughput is their sum, p50 and p90 the mean of theirs, p99 the largest (percentiles of different
processes do not merge exactly). A run whose windows do not agree within ``stability_pct`` is run once
more with ``retry_stability_pct`` (recorded in the row).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tensorwire.loadtest import _stats
from tensorwire.loadtest.launch import ServerProcess

SCRIPT = Path(__file__).with_name("perf_analyzer.sh")
UNSTABLE = "Failed to obtain stable measurement"
#: the benchmark scenarios' windows (full, quick): ``PerfAnalyzerRun`` keyword arguments
TIMING: tuple[dict[str, int], dict[str, int]] = (
    {"measurement_interval_ms": 3000, "stability_pct": 25, "retry_stability_pct": 100, "max_trials": 6},
    {"measurement_interval_ms": 300, "stability_pct": 1000, "retry_stability_pct": 10000, "max_trials": 5},
)
#: what the server's own statistics add to a row (queue and compute come from the CSV report)
_COUNTS = ("server_requests", "server_inferences", "server_executions", "server_avg_batch")
#: CSV columns (µs) -> row keys; absent when the server has no statistics extension
_SERVER_COLUMNS = {
    "Server Queue": "server_queue_us",
    "Server Compute Input": "compute_input",
    "Server Compute Infer": "compute_infer",
    "Server Compute Output": "compute_output",
}


def setup(timeout_s: float = 300) -> str | None:
    """Prepare the binary (cached after the first time); None when ready, else why it is not."""
    try:
        done = subprocess.run([str(SCRIPT), "--setup-only"], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"perf_analyzer setup did not finish within {timeout_s:.0f} s"
    except OSError as err:
        return f"cannot run {SCRIPT}: {err}"
    return None if done.returncode == 0 else done.stderr.strip()[-600:] or f"exit status {done.returncode}"


@dataclass(frozen=True)
class PerfAnalyzerRun:
    """What to measure: one model at one concurrency level, over gRPC (unary or streaming) or HTTP.

    ``protocol="http"`` sends ``-i http`` to the server's HTTP address (a server started with ``http=True``);
    ``streaming`` uses ``ModelStreamInfer`` (gRPC only); ``processes`` perf_analyzer processes run at
    once, each keeping ``concurrency`` requests in flight with ``batch_size`` rows per request.
    """

    model: str
    concurrency: int
    protocol: str = "grpc"
    streaming: bool = False
    processes: int = 1
    batch_size: int = 1
    measurement_interval_ms: int = 3000
    stability_pct: int = 25
    retry_stability_pct: int | None = 100
    max_trials: int = 6
    extra_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.protocol not in ("grpc", "http"):
            raise ValueError(f"protocol is grpc or http, not {self.protocol!r}")
        if self.streaming and self.protocol != "grpc":
            raise ValueError("--streaming needs the gRPC protocol")
        if min(self.concurrency, self.processes, self.batch_size) < 1:
            raise ValueError("concurrency, processes and batch_size must be >= 1")

    @property
    def mode(self) -> str:
        """``stream``, ``unary`` (gRPC) or ``http``: how requests travel."""
        return "stream" if self.streaming else ("unary" if self.protocol == "grpc" else "http")

    def args(self, url: str, inputs: Path, stability_pct: int, report: Path | None = None) -> list[str]:
        """perf_analyzer's command-line arguments for one process (``-f report`` last, when given)."""
        return [
            "-m",
            self.model,
            "-u",
            url,
            "-i",
            self.protocol,
            "--streaming" if self.streaming else "--async",
            "-b",
            str(self.batch_size),
            "--concurrency-range",
            str(self.concurrency),
            "--input-data",
            str(inputs),
            "-s",
            str(stability_pct),
            "--measurement-interval",
            str(self.measurement_interval_ms),
            "--max-trials",
            str(self.max_trials),
            *self.extra_args,
            *(["-f", str(report)] if report else []),
        ]

    def timeout_s(self) -> float:
        """The longest one attempt may take before it is killed."""
        return self.max_trials * self.measurement_interval_ms / 1e3 * 2 + 60


def read_report(path: Path) -> dict[str, Any]:
    """The numbers of one process's CSV report (one concurrency level): throughput, latencies in ms,
    the server-side split in µs where the server reported one (else those keys are None)."""
    with open(path, newline="") as handle:
        row = next(csv.DictReader(handle))

    def ms(column: str) -> float | None:
        return float(row[column]) / 1e3 if row.get(column) not in (None, "") else None

    server = {key: float(row[column]) for column, key in _SERVER_COLUMNS.items() if row.get(column) not in (None, "")}
    compute = [server.get(k) for k in ("compute_input", "compute_infer", "compute_output")]
    return {
        "throughput_rps": float(row["Inferences/Second"]),
        "latency_p50_ms": ms("p50 latency"),
        "latency_p90_ms": ms("p90 latency"),
        "latency_p99_ms": ms("p99 latency"),
        "latency_avg_ms": ms("Avg latency"),
        "server_queue_us": server.get("server_queue_us"),
        "server_compute_us": sum(compute) if None not in compute else None,
    }


def _combine(reports: list[dict[str, Any]]) -> dict[str, Any]:
    def mean(key: str) -> float | None:
        values = [r[key] for r in reports if r[key] is not None]
        return sum(values) / len(values) if values else None

    def top(key: str) -> float | None:
        values = [r[key] for r in reports if r[key] is not None]
        return max(values) if values else None

    return {
        "throughput_rps": sum(r["throughput_rps"] for r in reports),
        "latency_p50_ms": mean("latency_p50_ms"),
        "latency_p90_ms": mean("latency_p90_ms"),
        "latency_p99_ms": top("latency_p99_ms"),
        "latency_avg_ms": mean("latency_avg_ms"),
        "server_queue_us": mean("server_queue_us"),
        "server_compute_us": mean("server_compute_us"),
    }


def _server_counters(server: ServerProcess, model: str) -> _stats.ServerCounters | None:
    """The model's cumulative ModelStatistics, or None when the server has no statistics extension."""
    from tensorwire.client import InferenceClient, InferenceServerError, RetryPolicy

    try:
        with InferenceClient(server.address, retry=RetryPolicy.disabled(), timeout=10) as client:
            return _stats.ServerCounters.from_response(client.model_statistics(model), model)
    except InferenceServerError:
        return None


def _why(log: Path, status: int, timeout_s: float) -> str:
    if status < 0:
        return f"killed after {timeout_s:.0f} s"
    said = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    why = next((line for line in said if "rror" in line or "Failed" in line), said[-1] if said else "")
    return f"perf_analyzer exited {status}: {why}"


def _attempt(
    spec: PerfAnalyzerRun, url: str, inputs: Path, out_dir: Path, name: str, stability_pct: int
) -> tuple[list[dict[str, Any]], list[str], float]:
    """Run ``spec.processes`` processes at once; (their reports, their errors, wall seconds)."""
    processes = []
    started = time.perf_counter()
    for index in range(spec.processes):
        report, log = out_dir / f"{name}_p{index}.csv", out_dir / f"{name}_p{index}.log"
        report.unlink(missing_ok=True)
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [str(SCRIPT), *spec.args(url, inputs, stability_pct, report)], stdout=handle, stderr=subprocess.STDOUT
            )
        processes.append((process, report, log))
    reports, errors = [], []
    deadline = time.monotonic() + spec.timeout_s()
    for process, report, log in processes:
        try:
            status = process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            status = process.wait()
        if status == 0 and report.exists():
            reports.append(read_report(report))
        else:
            unstable = UNSTABLE in log.read_text(errors="replace")
            errors.append(("unstable: " if unstable else "") + _why(log, status, spec.timeout_s()))
    return reports, errors, time.perf_counter() - started


def run(spec: PerfAnalyzerRun, server: ServerProcess, inputs: Path, out_dir: Path, tag: str = "") -> dict[str, Any]:
    """Measure ``spec`` against ``server``; one row of numbers (see the module docstring), or with ``error``.

    ``inputs`` is a perf_analyzer ``--input-data`` file; logs and CSV reports go to ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    url = server.http_address if spec.protocol == "http" else server.address
    row: dict[str, Any] = {
        "model": spec.model,
        "concurrency": spec.concurrency,
        "mode": spec.mode,
        "processes": spec.processes,
        "batch_size": spec.batch_size,
        "spec": asdict(spec),
    }
    if url is None:
        return {**row, "error": "the server has no HTTP front-end (start it with http=True)"}
    name = f"{spec.model}_{spec.mode}_c{spec.concurrency}x{spec.processes}{tag}"
    bounds = [spec.stability_pct] + ([spec.retry_stability_pct] if spec.retry_stability_pct else [])
    for attempt, stability in enumerate(bounds, start=1):
        counters_before = _server_counters(server, spec.model)
        cpu_before, children_before = server.cpu_s(), _stats.reaped_children_cpu_s()
        reports, errors, wall = _attempt(spec, url, inputs, out_dir, f"{name}_try{attempt}", stability)
        cpu_after, children_after = server.cpu_s(), _stats.reaped_children_cpu_s()
        counters_after = _server_counters(server, spec.model)
        if server.process.poll() is not None:
            return {**row, "error": f"the server exited ({server.process.returncode}) during the run"}
        if errors:
            row["error"] = "; ".join(dict.fromkeys(errors))
            if attempt < len(bounds) and all(e.startswith("unstable") for e in errors):
                continue
            return row
        row.pop("error", None)
        row.update(_combine(reports))
        server_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        server_cores = None if server_cpu is None else server_cpu / wall
        throughput = row["throughput_rps"]
        row.update(
            {
                "stability_pct": stability,
                "attempts": attempt,
                "wall_s": wall,
                "server_cpu_cores": server_cores,
                "server_cpu_us_per_request": server_cores / throughput * 1e6 if server_cores and throughput else None,
                "perf_analyzer_cpu_cores": (children_after - children_before) / wall,
                **{k: v for k, v in _stats.server_delta(counters_before, counters_after).items() if k in _COUNTS},
                "command": "loadtest/perf_analyzer.sh " + " ".join(spec.args(url, Path(inputs.name), stability)),
            }
        )
        return row
    return row
