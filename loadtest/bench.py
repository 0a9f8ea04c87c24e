"""``tensorwire bench``: a closed-loop benchmark. How fast is it, and where is the knee?

    tensorwire bench --address 127.0.0.1:8001 --model cnn                 # a running server
    tensorwire bench --repo models --model cnn --ceiling --plot cnn.png    # start one here, on loopback
    tensorwire bench ... --concurrency 1,8,32,64 --mode sync,async,stream --json out.json

For each mode and each concurrency level N it keeps exactly N requests in flight (closed loop: each
of N workers sends its next request when the previous one is answered), warms up, then measures in
fixed windows until the last ``--stable-windows`` windows agree within ``--stability`` % on
throughput (or ``--max-windows`` pass: the level is then marked unstable and the last windows are
used anyway). The reported numbers cover exactly those last windows.

Modes: ``async`` = N asyncio tasks sharing one :class:`AsyncInferenceClient`, one unary ``ModelInfer``
call each; ``stream`` = N asyncio tasks sharing one ``ModelStreamInfer`` stream (N requests in flight
on it), the fast path: a Python server answers about twice as many requests per second over a stream
as over unary calls, because per-call set-up dominates its cost; ``sync`` = N threads sharing one
blocking :class:`InferenceClient`. The default runs ``async`` and ``stream`` and prints how many times
faster the stream was at each level.

Per level: requests, errors, window, throughput (requests/s and samples/s), latency p50/p90/p99 as the
client saw it, and from the server's ModelStatistics over the same windows: average batch
(Δinference_count / Δexecution_count) and the queue / compute time per request. CPU used by this
process and, with ``--server-pid`` (or a server started with ``--repo``), by the server and its child
processes (psutil): on a shared machine the two compete for the same cores.

``--ceiling`` first measures the in-process ONNX Runtime throughput of the same model file (found in
``--repo``, or ``--model-file``) at each batch size, with the replicas and threads of the model's
config.toml; each level then shows efficiency = served samples/s / the best ceiling among batch sizes
the level could form (≤ concurrency × rows per request, ≤ max_batch_size; rows per request when the
model does not batch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.client import AsyncInferenceClient, InferenceClient, InferenceServerError, RetryPolicy
from tensorwire.loadtest import _stats, report
from tensorwire.loadtest._cli import DefaultsOnceFormatter, positive_ints
from tensorwire.loadtest._inputs import InputSpec, parse_shape, request_inputs, rows_per_request
from tensorwire.loadtest.ceiling import (
    attach_efficiency,
    ceiling_batch_sizes,
    latest_model_file,
    measure_model_ceiling,
)
from tensorwire.loadtest.launch import serve

MODES = ("sync", "async", "stream")
#: unary and the stream side by side: the stream is the fast path, and the summary says by how much
DEFAULT_MODES = ("async", "stream")
DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class BenchSettings:
    """Everything a sweep needs (the CLI fills it; benchmarks.py builds it directly)."""

    address: str
    model: str
    version: str | None = None
    concurrency: Sequence[int] = DEFAULT_CONCURRENCY
    modes: Sequence[str] = DEFAULT_MODES
    batch_size: int = 1
    input_shape: Sequence[int] | None = None
    datatype: str | None = None
    warmup_s: float = 2.0
    window_s: float = 2.0
    stable_windows: int = 3
    max_windows: int = 10
    stability_pct: float = 10.0
    timeout_s: float = 30.0
    server_pid: int | None = None
    label: str | None = None  # a series name for plots and tables (default: the mode)
    ready_timeout_s: float = 60.0  # how long to wait for the server and model to be ready


# --------------------------------------------------------------------------- load generators


@dataclass
class Recorder:
    """What the workers report. list.append is atomic under the GIL: no lock on the hot path."""

    done: list[tuple[float, float]] = field(default_factory=list)  # (end time, latency s)
    failed: list[tuple[float, str]] = field(default_factory=list)  # (end time, error class)


def _threads_are_greenlets() -> bool:
    """Whether gevent has monkey-patched threading in this process (importing locust does that)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


class SyncLoad:
    """N threads, each calling ``InferenceClient.infer`` in a loop on one shared client."""

    def __init__(
        self, client: InferenceClient, settings: BenchSettings, inputs: dict[str, np.ndarray], recorder: Recorder
    ) -> None:
        if _threads_are_greenlets():
            raise RuntimeError(
                "threading is monkey-patched by gevent in this process (was locust imported?): sync "
                "workers would be greenlets blocking one another; run the benchmark in its own process"
            )
        self.client, self.settings, self.inputs, self.recorder = client, settings, inputs, recorder
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _worker(self) -> None:
        infer, model, inputs = self.client.infer, self.settings.model, self.inputs
        version, timeout = self.settings.version, self.settings.timeout_s
        done, failed = self.recorder.done.append, self.recorder.failed.append
        clock, stop = time.perf_counter, self._stop.is_set
        while not stop():
            started = clock()
            try:
                infer(model, inputs, version=version, timeout=timeout)
            except InferenceServerError as error:
                failed((clock(), type(error).__name__))
            else:
                end = clock()
                done((end, end - started))

    def start(self, concurrency: int) -> None:
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._worker, name=f"bench-{i}", daemon=True) for i in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.settings.timeout_s + 5)


class AsyncLoad:
    """N asyncio tasks on one event loop (in a thread of its own), unary or on one shared stream."""

    def __init__(
        self, settings: BenchSettings, inputs: dict[str, np.ndarray], recorder: Recorder, stream: bool
    ) -> None:
        self.settings, self.inputs, self.recorder, self.stream = settings, inputs, recorder, stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    async def _unary(self, client: AsyncInferenceClient) -> None:
        s, inputs = self.settings, self.inputs
        done, failed, clock = self.recorder.done.append, self.recorder.failed.append, time.perf_counter
        while not self._stop.is_set():
            started = clock()
            try:
                await client.infer(s.model, inputs, version=s.version, timeout=s.timeout_s)
            except InferenceServerError as error:
                failed((clock(), type(error).__name__))
            else:
                end = clock()
                done((end, end - started))

    async def _streamed(self, stream) -> None:
        inputs = self.inputs
        done, failed, clock = self.recorder.done.append, self.recorder.failed.append, time.perf_counter
        while not self._stop.is_set():
            started = clock()
            try:
                future = await stream.submit(inputs)
            except InferenceServerError as error:  # the stream itself is broken: stop this worker
                failed((clock(), type(error).__name__))
                return
            try:
                await future
            except InferenceServerError as error:
                failed((clock(), type(error).__name__))
            else:
                end = clock()
                done((end, end - started))

    async def _main(self, concurrency: int) -> None:
        s = self.settings
        async with AsyncInferenceClient(s.address, retry=RetryPolicy.disabled()) as client:
            if self.stream:
                async with client.stream(s.model, version=s.version, max_in_flight=concurrency) as stream:
                    await asyncio.gather(*(self._streamed(stream) for _ in range(concurrency)))
            else:
                await asyncio.gather(*(self._unary(client) for _ in range(concurrency)))

    def _run(self, concurrency: int) -> None:
        try:
            asyncio.run(self._main(concurrency))
        except BaseException as error:  # reported by the controller
            self.error = error

    def start(self, concurrency: int) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(concurrency,), name="bench-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.settings.timeout_s + 5)


# --------------------------------------------------------------------------- measurement


@dataclass
class Snapshot:
    t: float
    done: int
    failed: int
    client_cpu: float
    server_cpu: float | None
    server: _stats.ServerCounters | None


class Display:
    """Progress callbacks; this one is silent."""

    def start_level(self, label: str, concurrency: int, max_windows: int) -> None: ...
    def warming(self) -> None: ...
    def window(self, index: int, throughput: float, p99_ms: float | None, errors: int) -> None: ...
    def end_level(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class PlainDisplay(Display):
    """One line per level on stderr (for logs and non-terminals)."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr

    def end_level(self, row: dict[str, Any]) -> None:
        p99 = row.get("latency_p99_ms")
        head = f"bench: {row['model']} {row['series']} c={row['concurrency']}: "
        if p99 is None:
            text = f"no successful request ({row['errors']} errors)"
        else:
            text = (
                f"{row['throughput_rps']:,.0f} req/s, p99 {p99:.2f} ms, errors {row['errors']}, "
                f"last {row['windows']} of {row['windows_run']} windows, "
                f"{'stable' if row['stable'] else 'NOT stable'}"
            )
        print(head + text, file=self.stream, flush=True)

    def message(self, text: str) -> None:
        print(f"bench: {text}", file=self.stream, flush=True)


class RichDisplay(Display):
    """A live progress bar per level (rich), on stderr."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self.progress.start()
        self.task = None

    def start_level(self, label: str, concurrency: int, max_windows: int) -> None:
        self.task = self.progress.add_task("", total=max_windows, label=f"{label} c={concurrency}", status="starting")

    def warming(self) -> None:
        self.progress.update(self.task, status="warming up")

    def window(self, index: int, throughput: float, p99_ms: float | None, errors: int) -> None:
        p99 = f"{p99_ms:.2f} ms" if p99_ms is not None else "–"
        self.progress.update(self.task, completed=index, status=f"{throughput:,.0f} req/s  p99 {p99}  errors {errors}")

    def end_level(self, row: dict[str, Any]) -> None:
        p99 = row.get("latency_p99_ms")
        status = f"{row['throughput_rps']:,.0f} req/s  p99 {p99:.2f} ms" if p99 is not None else "no answers"
        status += "" if row["stable"] else "  [yellow](not stable)"
        self.progress.update(self.task, completed=self.progress.tasks[-1].total, status=status)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        self.progress.stop()


def make_display(kind: str) -> Display:
    """``auto``: rich on a terminal, plain lines otherwise; ``rich``, ``plain``, ``none``."""
    if kind == "none":
        return Display()
    if kind in ("auto", "rich"):
        if kind == "rich" or sys.stderr.isatty():
            try:
                return RichDisplay()
            except ImportError:
                pass
    return PlainDisplay()


class Sweep:
    """Runs the levels of one model against one server."""

    def __init__(self, settings: BenchSettings, display: Display | None = None) -> None:
        for mode in settings.modes:
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
        if settings.stable_windows < 1 or settings.max_windows < settings.stable_windows:
            raise ValueError("need 1 <= stable windows <= max windows")
        self.settings = settings
        self.display = display or Display()
        self.client = InferenceClient(settings.address, retry=RetryPolicy.disabled(), timeout=settings.timeout_s)
        self.inputs: dict[str, np.ndarray] = {}
        self.specs: list[InputSpec] = []
        self.max_batch_size: int | None = None
        self.batching: bool | None = None

    def close(self) -> None:
        self.client.close()

    def prepare(self) -> None:
        s = self.settings
        self.client.wait_until_ready(s.model, timeout=s.ready_timeout_s)
        self.inputs, self.specs, self.max_batch_size = request_inputs(
            self.client, s.model, s.batch_size, s.input_shape, s.datatype, seed=0, version=s.version
        )
        try:
            config = self.client.model_config(s.model, s.version)
            self.batching = config.max_batch_size > 0 and config.HasField("dynamic_batching")
        except InferenceServerError:
            self.batching = None

    @property
    def rows(self) -> int:
        return rows_per_request(self.specs)

    def _snapshot(self, recorder: Recorder) -> Snapshot:
        """Client counters right after the server's statistics (so both count the same requests), then CPU."""
        try:
            response = self.client.model_statistics(self.settings.model, self.settings.version, timeout=10)
            server = _stats.ServerCounters.from_response(response, self.settings.model)
        except InferenceServerError:
            server = None
        t = time.perf_counter()
        done, failed = len(recorder.done), len(recorder.failed)
        client_cpu = _stats.own_cpu_s()
        pid = self.settings.server_pid
        server_cpu = _stats.process_tree_cpu_s(pid) if pid else None
        return Snapshot(t, done, failed, client_cpu, server_cpu, server)

    def run_level(self, mode: str, concurrency: int) -> dict[str, Any]:
        s = self.settings
        recorder = Recorder()
        if mode == "sync":
            load: SyncLoad | AsyncLoad = SyncLoad(self.client, s, self.inputs, recorder)
        else:
            load = AsyncLoad(s, self.inputs, recorder, stream=mode == "stream")
        label = s.label or mode
        self.display.start_level(f"{s.model} {label}", concurrency, s.max_windows)
        load.start(concurrency)
        try:
            self.display.warming()
            time.sleep(s.warmup_s)
            snaps = [self._snapshot(recorder)]
            throughputs: list[float] = []
            while len(throughputs) < s.max_windows:
                time.sleep(max(0.0, snaps[-1].t + s.window_s - time.perf_counter()))
                snaps.append(self._snapshot(recorder))
                a, b = snaps[-2], snaps[-1]
                throughputs.append((b.done - a.done) / (b.t - a.t))
                recent = [lat for _, lat in recorder.done[a.done : b.done]]
                p99 = _stats.percentiles_ms(recent)["latency_p99_ms"]
                self.display.window(len(throughputs), throughputs[-1], p99, b.failed - a.failed)
                if isinstance(load, AsyncLoad) and load.error is not None:
                    break
                if len(throughputs) >= s.stable_windows and _stats.is_stable(
                    throughputs[-s.stable_windows :], s.stability_pct
                ):
                    break
        finally:
            load.stop()
        if isinstance(load, AsyncLoad) and load.error is not None:
            raise RuntimeError(f"the {mode} load generator failed: {load.error!r}") from load.error
        used = min(s.stable_windows, len(throughputs))
        row = self.summarize(mode, concurrency, recorder, snaps[-used - 1], snaps[-1], throughputs, used)
        self.display.end_level(row)
        return row

    def summarize(
        self,
        mode: str,
        concurrency: int,
        recorder: Recorder,
        first: Snapshot,
        last: Snapshot,
        throughputs: list[float],
        used: int,
    ) -> dict[str, Any]:
        s = self.settings
        window_s = last.t - first.t
        requests = last.done - first.done
        errors = last.failed - first.failed
        latencies = [lat for _, lat in recorder.done[first.done : last.done]]
        kinds: dict[str, int] = {}
        for _, kind in recorder.failed:
            kinds[kind] = kinds.get(kind, 0) + 1
        throughput = requests / window_s if window_s > 0 else 0.0
        row: dict[str, Any] = {
            "model": s.model,
            "model_version": s.version,
            "series": s.label or mode,
            "mode": mode,
            "concurrency": concurrency,
            "batch_size": self.rows,
            "requests": requests,
            "errors": errors,
            "window_s": window_s,
            "windows": used,
            "windows_run": len(throughputs),
            "window_throughputs_rps": throughputs,
            "stable": len(throughputs) >= s.stable_windows
            and _stats.is_stable(throughputs[-s.stable_windows :], s.stability_pct),
            "stability_pct": s.stability_pct,
            "spread_pct": _stats.spread_pct(throughputs[-used:]),
            "throughput_rps": throughput,
            "throughput_samples_per_s": throughput * self.rows,
            **_stats.percentiles_ms(latencies),
            "errors_total": len(recorder.failed),
            "error_kinds": kinds,
            **_stats.server_delta(first.server, last.server),
        }
        client_cpu = last.client_cpu - first.client_cpu
        row["client_cpu_cores"] = client_cpu / window_s if window_s > 0 else None
        row["client_cpu_us_per_request"] = client_cpu / requests * 1e6 if requests else None
        if first.server_cpu is not None and last.server_cpu is not None:
            server_cpu = last.server_cpu - first.server_cpu
            row["server_cpu_cores"] = server_cpu / window_s if window_s > 0 else None
            row["server_cpu_us_per_request"] = server_cpu / requests * 1e6 if requests else None
        else:
            row["server_cpu_cores"] = row["server_cpu_us_per_request"] = None
        row.update(ceiling_batch=None, ceiling_samples_per_s=None, efficiency=None)
        return row

    def run(self) -> list[dict[str, Any]]:
        rows = []
        for mode in self.settings.modes:
            for concurrency in self.settings.concurrency:
                rows.append(self.run_level(mode, concurrency))
        return rows


# --------------------------------------------------------------------------- one model, end to end


def bench_model(
    settings: BenchSettings,
    *,
    display: Display | None = None,
    ceiling: bool = False,
    model_file: Path | None = None,
    model_config: Any | None = None,
    ceiling_s: float = 0.5,
    ceiling_repeats: int = 2,
    ceiling_threads: int | None = None,
    ceiling_replicas: int | None = None,
) -> dict[str, Any]:
    """Run the sweep (and the ceiling first, if asked); returns the JSON document."""
    display = display or Display()
    sweep = Sweep(settings, display)
    started = time.time()
    load_before = _stats.load_average()
    try:
        sweep.prepare()
        ceiling_rows: list[dict[str, Any]] = []
        ceiling_info: dict[str, Any] | None = None
        if ceiling:
            if model_file is None or model_file.suffix != ".onnx":
                display.message(
                    f"ceiling skipped: no local ONNX model file for {settings.model} (give --repo or --model-file)"
                )
                ceiling_info = {"skipped": "no local ONNX model file"}
            else:
                sizes = ceiling_batch_sizes(
                    sweep.rows, sweep.max_batch_size or 0, bool(sweep.batching), settings.concurrency
                )
                display.message(f"ceiling: {model_file.name} at batch sizes {sizes}")
                ceiling_rows, ceiling_info = measure_model_ceiling(
                    model_file, model_config, sizes, ceiling_s, ceiling_repeats, ceiling_threads, ceiling_replicas
                )
        rows = sweep.run()
        attach_efficiency(rows, ceiling_rows, sweep.max_batch_size or 0, bool(sweep.batching))
    finally:
        sweep.close()
    knee_row = report.knee(rows)
    return {
        "tool": "tensorwire bench",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": report.machine(),
        "load_average_before": load_before,
        "load_average_after": _stats.load_average(),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
        "model": {
            "name": settings.model,
            "inputs": [{"name": sp.name, "datatype": sp.datatype, "shape": list(sp.shape)} for sp in sweep.specs],
            "max_batch_size": sweep.max_batch_size,
            "dynamic_batching": sweep.batching,
        },
        "ceiling": ceiling_rows,
        "ceiling_settings": ceiling_info,
        "levels": rows,
        "stream_vs_unary": stream_vs_unary(rows),
        "knee": None
        if knee_row is None
        else {
            "mode": knee_row["mode"],
            "concurrency": knee_row["concurrency"],
            "throughput_rps": knee_row["throughput_rps"],
            "latency_p99_ms": knee_row["latency_p99_ms"],
        },
    }


# --------------------------------------------------------------------------- command line


def _modes(text: str) -> list[str]:
    modes = [t.strip() for t in text.split(",") if t.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} (comma-separated); got {text!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorwire bench",
        description="Closed-loop benchmark of one model: a concurrency sweep with warm-up, stable "
        "measurement windows, client and server-side numbers, JSON and a plot.",
        formatter_class=DefaultsOnceFormatter,
    )
    target = parser.add_argument_group("target")
    target.add_argument("--model", "-m", required=True, help="model name")
    target.add_argument("--model-version", default=None, help="model version (default: the server's choice)")
    target.add_argument(
        "--address",
        "-a",
        default=None,
        help="server host:port (default: start a server on loopback for --repo, else 127.0.0.1:8001)",
    )
    target.add_argument(
        "--repo",
        type=Path,
        default=None,
        help="model repository: without --address a server for it is started on a free "
        "loopback port; with --ceiling the model file is read from it",
    )
    target.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="the server's process id, to report its CPU use (and its child processes')",
    )
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        "-c",
        type=positive_ints,
        default=list(DEFAULT_CONCURRENCY),
        help="requests in flight, comma-separated levels",
    )
    load.add_argument(
        "--mode",
        type=_modes,
        default=list(DEFAULT_MODES),
        help="comma-separated: async (unary calls from asyncio tasks), stream (one ModelStreamInfer stream: "
        "the fast path), sync (threads, the blocking client)",
    )
    load.add_argument("--batch-size", "-b", type=int, default=1, help="rows per request (batched models)")
    load.add_argument(
        "--input-shape",
        default=None,
        help="per-sample shape without the batch dimension, e.g. 3,32,32 (default: from metadata)",
    )
    load.add_argument("--datatype", default=None, help="input datatype (default: from metadata)")
    load.add_argument("--timeout", type=float, default=30.0, help="deadline per request, seconds")
    load.add_argument(
        "--ready-timeout", type=float, default=60.0, help="seconds to wait for the server and the model to be ready"
    )
    measure = parser.add_argument_group("measurement")
    measure.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, per level")
    measure.add_argument("--window", type=float, default=2.0, help="seconds per measurement window")
    measure.add_argument(
        "--stable-windows",
        type=int,
        default=3,
        help="consecutive windows that must agree; the numbers cover these windows",
    )
    measure.add_argument(
        "--stability",
        type=float,
        default=10.0,
        help="windows agree when each is within this %% of their mean throughput",
    )
    measure.add_argument("--max-windows", type=int, default=10, help="give up on stability after this many")
    ceil = parser.add_argument_group("ceiling")
    ceil.add_argument(
        "--ceiling",
        action="store_true",
        help="measure in-process ONNX Runtime throughput of the model file first; report efficiency = served / ceiling",
    )
    ceil.add_argument("--model-file", type=Path, default=None, help="the model.onnx (default: from --repo)")
    ceil.add_argument(
        "--ceiling-threads", type=int, default=None, help="intra-op threads (default: as the server places the model)"
    )
    ceil.add_argument(
        "--ceiling-replicas", type=int, default=None, help="sessions side by side (default: the model's instance count)"
    )
    ceil.add_argument("--ceiling-seconds", type=float, default=0.5, help="window per ceiling point")
    ceil.add_argument("--ceiling-repeats", type=int, default=2, help="windows per ceiling point")
    out = parser.add_argument_group("output")
    out.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON ('-': stdout)")
    out.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="throughput and p99 against concurrency (needs matplotlib)",
    )
    out.add_argument("--markdown", action="store_true", help="print the summary as a markdown table")
    out.add_argument(
        "--progress",
        choices=["auto", "rich", "plain", "none"],
        default="auto",
        help="progress display (auto: rich on a terminal, one line per level otherwise)",
    )
    return parser


def stream_vs_unary(levels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per concurrency level measured both ways: the stream's throughput against unary calls' (``async``
    preferred, else ``sync``); ``ratio`` = stream req/s ÷ unary req/s."""
    by = {(r["mode"], r["concurrency"]): r for r in levels if r.get("throughput_rps")}
    pairs = []
    for concurrency in dict.fromkeys(r["concurrency"] for r in levels):
        stream = by.get(("stream", concurrency))
        unary = by.get(("async", concurrency)) or by.get(("sync", concurrency))
        if stream and unary:
            pairs.append(
                {
                    "concurrency": concurrency,
                    "unary_mode": unary["mode"],
                    "unary_rps": unary["throughput_rps"],
                    "stream_rps": stream["throughput_rps"],
                    "ratio": stream["throughput_rps"] / unary["throughput_rps"],
                }
            )
    return pairs


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The sentences under the table: stream vs unary per level (or how to see it), the knee, the load."""
    lines = []
    pairs = document.get("stream_vs_unary") or []
    if pairs:
        lines.append(
            "stream vs unary (the stream is the fast path): "
            + "; ".join(
                f"c={p['concurrency']}: {p['stream_rps']:,.0f} vs {p['unary_rps']:,.0f} req/s ({p['ratio']:.2f}×)"
                for p in pairs
            )
        )
    elif "stream" not in {r["mode"] for r in document["levels"]}:
        lines.append("tip: add --mode stream to measure the ModelStreamInfer fast path beside unary calls")
    knee_row = document.get("knee")
    if knee_row:
        lines.append(
            f"knee: {knee_row['mode']} at concurrency {knee_row['concurrency']} reaches 90 % of the "
            f"peak throughput ({knee_row['throughput_rps']:,.0f} req/s, p99 "
            f"{knee_row['latency_p99_ms']:.2f} ms)"
        )
    load = document.get("load_average_before")
    if load is not None:
        lines.append(f"load average before: {load:.2f}")
    return lines


def print_summary(document: dict[str, Any], markdown: bool, stream=None) -> None:
    """The levels as a table (rich on a terminal, markdown otherwise or with ``markdown``), then
    :func:`summary_lines`."""
    stream = stream or sys.stdout
    rows = document["levels"]
    lines = summary_lines(document)
    if not markdown and stream.isatty():
        try:
            from rich.console import Console

            console = Console(file=stream)
            console.print(report.rich_table(rows, title=f"tensorwire bench: {document['model']['name']}"))
            for text in lines:
                console.print(text)
            return
        except ImportError:
            pass
    print(report.markdown_table(rows), file=stream)
    for text in lines:
        print(f"\n{text}", file=stream)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.address is None and args.repo is None:
        args.address = "127.0.0.1:8001"
    if args.stable_windows < 1 or args.max_windows < args.stable_windows:
        parser.error("need 1 <= --stable-windows <= --max-windows")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    try:
        shape = parse_shape(args.input_shape)
    except ValueError as err:
        parser.error(str(err))
    model_file, model_config = args.model_file, None
    if args.repo is not None:
        try:
            found, model_config = latest_model_file(args.repo, args.model, args.model_version)
        except Exception as err:
            parser.error(f"cannot read model {args.model!r} from {args.repo}: {err}")
        model_file = model_file or found

    if args.plot is not None:  # fail before a long run, not after it
        try:
            from tensorwire.loadtest.plot import _pyplot

            _pyplot()
        except Exception as err:
            parser.error(str(err))

    def run(address: str, pid: int | None) -> dict[str, Any]:
        settings = BenchSettings(
            address=address,
            model=args.model,
            version=args.model_version,
            concurrency=args.concurrency,
            modes=args.mode,
            batch_size=args.batch_size,
            input_shape=shape,
            datatype=args.datatype,
            warmup_s=args.warmup,
            window_s=args.window,
            stable_windows=args.stable_windows,
            max_windows=args.max_windows,
            stability_pct=args.stability,
            timeout_s=args.timeout,
            server_pid=pid,
            ready_timeout_s=args.ready_timeout,
        )
        display = make_display(args.progress)
        try:
            return bench_model(
                settings,
                display=display,
                ceiling=args.ceiling,
                model_file=model_file,
                model_config=model_config,
                ceiling_s=args.ceiling_seconds,
                ceiling_repeats=args.ceiling_repeats,
                ceiling_threads=args.ceiling_threads,
                ceiling_replicas=args.ceiling_replicas,
            )
        finally:
            display.close()

    load = _stats.load_average()
    if load is not None and load > report.usable_cores() * 0.75:
        print(
            f"bench: warning: load average {load:.2f} on {report.usable_cores()} cores before starting; "
            "other processes compete for the CPU and the numbers will be low and noisy",
            file=sys.stderr,
        )
    try:
        if args.address is None:
            with serve(args.repo, "--drain-seconds", "0", metrics=False, ready_timeout=300) as server:
                document = run(server.address, server.pid)
                document["server"] = {"started_by_bench": True, "repo": str(args.repo)}
        else:
            document = run(args.address, args.server_pid)
    except InferenceServerError as err:
        print(f"tensorwire bench: error: {err}", file=sys.stderr)
        return 1
    except (RuntimeError, ValueError) as err:
        print(f"tensorwire bench: error: {err}", file=sys.stderr)
        return 1
    document["command"] = "tensorwire bench " + " ".join(argv if argv is not None else sys.argv[1:])

    print_summary(document, args.markdown, sys.stderr if args.json == "-" else sys.stdout)
    if args.json == "-":
        json.dump(document, sys.stdout, indent=2)
        print()
    elif args.json:
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if args.plot is not None:
        from tensorwire.loadtest.plot import plot_levels

        plot_levels(document["levels"], args.plot, title=f"tensorwire bench: {args.model}")
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
