"""Front-end processes: ``tensorwire serve --workers 1`` against ``--workers 2`` (a scenario's measure/render pair).

What is measured, with Triton's perf_analyzer beside the server (gRPC, unary ``--async`` and ``--streaming``):

- one perf_analyzer at concurrency 1 and 64 (about 3 TCP connections: the kernel spreads *connections*
  over the front-end processes, so one client gives them little to share), and four perf_analyzer processes
  at concurrency 16 each (about 12 connections: many clients, as behind a load balancer);
- identity (pure serving overhead) and the 63-MFLOP CNN (the engine's model threads need the cores too);
- each level against both servers in turn, A/B interleaved (the order alternates between rounds), repeated
  ``rounds`` times; the table gives each server's median, so that the noise of a shared machine hits both.

Server CPU per request is the whole process tree's (psutil: the engine process and every front-end) over the
measurement. The per-request cost of the IPC hop is read at concurrency 1, where nothing else differs: the
p50 latency and the server CPU per request of ``--workers 2`` minus those of ``--workers 1``.

Targets: ``--workers 2`` ≥ 1.3× ``--workers 1`` on identity with four perf_analyzers at c=16,
and never slower than ``--workers 1`` on the CNN with one perf_analyzer.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

from tensorwire.loadtest import report
from tensorwire.loadtest.harness import TENSORWIRE, Context, Page, ServerSpec
from tensorwire.loadtest.perf_analyzer import PerfAnalyzerRun
from tensorwire.loadtest.report import find_row, fmt, outcome

ONE = TENSORWIRE.with_args("--workers", "1")
TWO = TENSORWIRE.with_args("--workers", "2")
#: the servers compared, in their order in the first round
SERVERS: tuple[ServerSpec, ...] = (ONE, TWO)
MODELS = ("identity", "cnn")
#: (concurrency per process, perf_analyzer processes)
LEVELS = ((1, 1), (64, 1), (16, 4))
MODES = ("unary", "stream")
TARGET_MANY_CONNECTIONS = 1.3
TARGET_ONE_CLIENT_CNN = 1.0
#: perf_analyzer's windows (full, quick): shorter than the other scenarios', repeated instead (medians)
TIMING = (
    {"measurement_interval_ms": 2000, "stability_pct": 30, "retry_stability_pct": 100, "max_trials": 5},
    {"measurement_interval_ms": 300, "stability_pct": 1000, "retry_stability_pct": 10000, "max_trials": 5},
)
NUMBERS = ("throughput_rps", "latency_p50_ms", "latency_p99_ms", "server_cpu_us_per_request", "server_cpu_cores")


def measure(ctx: Context) -> dict[str, Any]:
    """Every (model, level, mode) against both servers, interleaved, ``rounds`` times; medians per server."""
    ctx.require_perf_analyzer()
    rounds = ctx.pick(3, 1)
    timing = ctx.pick(*TIMING)
    levels = ctx.pick(LEVELS, ((1, 1), (4, 1), (2, 2)))
    repo = ctx.repo("workers", list(MODELS))
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as running:
        servers = [(spec, running.enter_context(ctx.server(repo, spec, MODELS))) for spec in SERVERS]
        for model in MODELS:
            for concurrency, processes in levels:
                for mode in MODES:
                    for round_index in range(rounds):
                        order = servers if round_index % 2 == 0 else servers[::-1]
                        for spec, server in order:
                            run = PerfAnalyzerRun(
                                model, concurrency, streaming=mode == "stream", processes=processes, **timing
                            )
                            row = ctx.perf_analyzer(run, server, tag=f"_{spec.label.split()[-1]}w_r{round_index}")
                            runs.append({**row, "server": spec.label, "round": round_index})
    result = {
        "settings": {**timing, "rounds": rounds},
        "servers": [spec.label for spec in SERVERS],
        "cores": report.usable_cores(),
        "runs": runs,
        "rows": medians(runs),
    }
    result["targets"] = targets(result["rows"])
    result["ipc"] = ipc_cost(result["rows"])
    return result


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, concurrency, processes, mode, server): the median of each number over the rounds
    that succeeded (``rounds_ok`` of ``rounds``)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["model"], run["concurrency"], run["processes"], run["mode"], run["server"])
        groups.setdefault(key, []).append(run)
    rows = []
    for (model, concurrency, processes, mode, server), group in groups.items():
        ok = [r for r in group if "error" not in r]
        row: dict[str, Any] = {
            "model": model,
            "concurrency": concurrency,
            "processes": processes,
            "mode": mode,
            "server": server,
            "rounds": len(group),
            "rounds_ok": len(ok),
        }
        for name in NUMBERS:
            values = [r[name] for r in ok if r.get(name) is not None]
            row[name] = statistics.median(values) if values else None
        if not ok:
            row["error"] = group[-1].get("error", "no successful round")
        rows.append(row)
    return rows


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    if not a or not b or not b.get("throughput_rps"):
        return None
    return a["throughput_rps"] / b["throughput_rps"]


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The two targets, as ratios of medians: many connections on identity, one client on the CNN."""
    found = []
    many = [(c, p) for c, p in {(r["concurrency"], r["processes"]) for r in rows} if p > 1]
    for concurrency, processes in many:
        for mode in MODES:
            level = {"model": "identity", "concurrency": concurrency, "processes": processes, "mode": mode}
            value = _ratio(find_row(rows, **level, server=TWO.label), find_row(rows, **level, server=ONE.label))
            found.append(
                {
                    "name": f"identity_{processes}x{concurrency}_{mode}",
                    "text": f"identity, {processes} perf_analyzers × c={concurrency}, {mode}: --workers 2 ÷ "
                    f"--workers 1 = {fmt(value, '{:.2f}')}× (target ≥ {TARGET_MANY_CONNECTIONS}×)",
                    "value": value,
                    "met": None if value is None else value >= TARGET_MANY_CONNECTIONS,
                }
            )
    for concurrency in sorted({r["concurrency"] for r in rows if r["processes"] == 1}):
        for mode in MODES:
            value = _ratio(
                find_row(rows, model="cnn", concurrency=concurrency, processes=1, mode=mode, server=TWO.label),
                find_row(rows, model="cnn", concurrency=concurrency, processes=1, mode=mode, server=ONE.label),
            )
            found.append(
                {
                    "name": f"cnn_1x{concurrency}_{mode}",
                    "text": f"CNN, one perf_analyzer, c={concurrency}, {mode}: --workers 2 ÷ --workers 1 = "
                    f"{fmt(value, '{:.2f}')}× (target ≥ {TARGET_ONE_CLIENT_CNN}×: never slower)",
                    "value": value,
                    "met": None if value is None else value >= TARGET_ONE_CLIENT_CNN,
                }
            )
    return found


def ipc_cost(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model and mode at concurrency 1: what ``--workers 2`` adds per request (p50 ms, server CPU µs)."""
    found = []
    for model in MODELS:
        for mode in MODES:
            one = find_row(rows, model=model, concurrency=1, processes=1, mode=mode, server=ONE.label)
            two = find_row(rows, model=model, concurrency=1, processes=1, mode=mode, server=TWO.label)
            if not one or not two:
                continue

            def delta(key: str, one: dict = one, two: dict = two) -> float | None:
                return None if one.get(key) is None or two.get(key) is None else two[key] - one[key]

            found.append(
                {
                    "model": model,
                    "mode": mode,
                    "latency_p50_ms": delta("latency_p50_ms"),
                    "server_cpu_us_per_request": delta("server_cpu_us_per_request"),
                }
            )
    return found


COLUMNS = [
    ("model", "model", "{}"),
    ("level", "load", "{}"),
    ("mode", "mode", "{}"),
    ("server", "server", "{}"),
    ("throughput_rps", "infer/s", "{:,.0f}"),
    ("vs_one", "÷ --workers 1", "{:.2f}×"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("server_cpu_cores", "server cores", "{:.2f}"),
    ("server_cpu_us_per_request", "server CPU µs/req", "{:,.0f}"),
    ("rounds_ok", "rounds", "{}"),
]


def render(result: dict[str, Any], page: Page) -> str:
    """The medians table with the ratio to ``--workers 1``, the IPC cost at c=1, the targets."""
    s = result["settings"]
    rows = []
    for r in result["rows"]:
        base = find_row(
            result["rows"],
            model=r["model"],
            concurrency=r["concurrency"],
            processes=r["processes"],
            mode=r["mode"],
            server=ONE.label,
        )
        level = f"c={r['concurrency']}" if r["processes"] == 1 else f"{r['processes']} × c={r['concurrency']}"
        rows.append({**r, "level": level, "vs_one": _ratio(r, base) if "error" not in r else None})
    lines = [
        f"`tensorwire serve --workers 1` and `--workers 2` on the same repository (identity: 1 replica × 1 thread; "
        f"the CNN: 2 × 1), both up at once, on {result['cores']} cores shared with the load generators. Each "
        "level is measured against one server, then the other (the order alternates), "
        f"{s['rounds']} rounds; the table gives medians. perf_analyzer `-i grpc --async|--streaming`, "
        f"`--measurement-interval {s['measurement_interval_ms']}`, `-s {s['stability_pct']}` "
        f"(`{s['retry_stability_pct']}` on a retry), `--max-trials {s['max_trials']}`; server CPU is the whole "
        "process tree's (engine and front-ends), per request.",
        "",
        "Command: `python -m tensorwire.loadtest.benchmarks --only workers` (on a quiet machine).",
        "",
        report.markdown_table(rows, COLUMNS),
        "",
        "Per-request cost of the IPC hop (concurrency 1, `--workers 2` minus `--workers 1`):",
        "",
    ]
    for cost in result["ipc"]:
        lines.append(
            f"- {cost['model']}, {cost['mode']}: p50 {fmt(cost['latency_p50_ms'], '{:+.3f}')} ms, server CPU "
            f"{fmt(cost['server_cpu_us_per_request'], '{:+,.0f}')} µs per request"
        )
    lines += ["", "Targets:", ""] + [f"- {t['text']}: **{outcome(t['met'])}**" for t in result["targets"]]
    return "\n".join(lines)
