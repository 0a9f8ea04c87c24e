"""The named benchmark scenarios, in the order of BENCHMARKS.md (how to add one: :mod:`.harness`).

- ``closed-loop``: ``tensorwire bench`` sweeps of five models, dynamic batching on and off, against the
  in-process ONNX Runtime ceiling of the same files
- ``load-generators``: one server, identity at concurrency 64, driven by ``tensorwire bench``, locust and
  perf_analyzer, each unary and over a stream
- ``serving-time``: where a request's time goes: CPU per request on both sides and a py-spy profile
- ``perf-analyzer``: perf_analyzer at concurrency 1/4/16/64 (identity, CNN) and the CNN's ceiling
- ``bare-baseline``: tensorwire against a bare grpc.aio server, unary and streaming, with server CPU
- ``many-connections``: several perf_analyzer processes at once against each server
- ``http-frontend``: HTTP/REST next to gRPC on one server (perf_analyzer ``-i http`` and ``-i grpc``)
- ``variable-length``: the Transformer classifier on lengths 8-128 at concurrency 64, padding on and off
- ``int8-served``: the INT8 CNN against the FP32 one, served and in process
- ``sdk-overhead``: the client SDK against the raw gRPC stub; streams against unary calls
- ``trainer-int8``: the trainer's INT8 and DDP table (``python -m tensorwire.trainer.bench_int8``)
- ``trainer-compression``: the trainer's compression table (``python -m tensorwire.trainer.bench_compression``)
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tensorwire.loadtest import frontends, report, variable_length, workers_scaling
from tensorwire.loadtest.ceiling import latest_model_file, measure_ceiling, measure_model_ceiling
from tensorwire.loadtest.harness import (
    BARE,
    CNN_INT8,
    NOBATCH,
    SCENARIOS,
    TENSORWIRE,
    Context,
    Page,
    Scenario,
    Skipped,
    command_scenario,
    register,
)
from tensorwire.loadtest.locust_runner import locust_command, run_headless
from tensorwire.loadtest.perf_analyzer import TIMING as PA_TIMING
from tensorwire.loadtest.perf_analyzer import PerfAnalyzerRun
from tensorwire.loadtest.report import find_row, fmt, outcome, pa_table

__all__ = ["SCENARIOS"]

NOTES = Path(__file__).with_name("benchmarks_notes.md")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _best(rows: list[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    """The row of highest samples/s among those matching ``where``."""
    chosen = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    return max(chosen, key=lambda r: r["samples_per_s"]) if chosen else None


#: closed-loop timing: tensorwire bench's windows (full, quick)
TIMING = (
    {"warmup_s": 1.5, "window_s": 1.5, "stable_windows": 3, "max_windows": 6, "stability_pct": 10.0},
    {"warmup_s": 0.1, "window_s": 0.2, "stable_windows": 1, "max_windows": 1, "stability_pct": 10.0},
)


# =========================================================================== closed-loop

CLOSED_LOOP_MODELS = ("identity", "cnn", "wide_mlp", "digits_cnn", "digits_cnn_int8")
DESCRIPTIONS = {
    "identity": "FP32 [16] → Identity: no compute at all, pure serving overhead",
    "cnn": "FP32 [3, 32, 32] → 10, ResNet-style (16/32/64 channels, 7 basic blocks), 63 MFLOPs/sample",
    "wide_mlp": "FP32 [512] → 4096 → 4096 → [512], 21 M parameters (84 MB): weight-bandwidth-bound at batch 1",
    "digits_cnn": "FP32 [1, 8, 8] → 10, the default repository's digits CNN (trained here)",
    "digits_cnn_int8": "the same digits CNN, static INT8 (QDQ, per-channel) with ONNX Runtime",
}
SWEEP_COLUMNS = [
    ("series", "variant", "{}"),
    ("concurrency", "conc.", "{}"),
    ("throughput_samples_per_s", "samples/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p90_ms", "p90 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("server_avg_batch", "avg batch", "{:.1f}"),
    ("server_queue_us", "queue µs", "{:,.0f}"),
    ("server_compute_us", "compute µs", "{:,.0f}"),
    ("ceiling_samples_per_s", "ceiling", "{:,.0f}"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("errors", "errors", "{}"),
    ("server_cpu_cores", "server CPU", "{:.2f}"),
    ("client_cpu_cores", "client CPU", "{:.2f}"),
    ("stable", "stable", "{}"),
]


def measure_closed_loop(ctx: Context) -> dict[str, Any]:
    """Per model: the ceiling (samples/s by batch size), then closed-loop levels with batching on and off (and a
    stream for identity); each level as ``tensorwire bench`` reports it (req/s, ms, µs, cores)."""
    s = {
        "models": ctx.pick(list(CLOSED_LOOP_MODELS), ["identity"]),
        "concurrency": ctx.pick([1, 8, 32, 64], [1, 2]),
        "mode": "async",
        "timing": ctx.pick(*TIMING),
        "ceiling_seconds": ctx.pick(0.5, 0.02),
        "ceiling_repeats": ctx.pick(2, 1),
    }
    skipped = ctx.build(s["models"])  # a digits model that missed its accuracy gate is left out, saying why
    models = [m for m in s["models"] if m not in skipped]
    names = [*models, *(m + NOBATCH for m in models)]
    repo = ctx.repo("closed-loop", names)
    result: dict[str, Any] = {"settings": s, "models": {}, "ceilings": {}, "levels": [], "skipped": skipped}
    with ctx.server(repo, models=names) as server:
        for model in models:
            model_file, config = latest_model_file(repo, model)
            ctx.log(f"{model}: in-process ceiling at batch sizes {list(BATCH_SIZES)}")
            ceiling, info = measure_model_ceiling(
                model_file, config, BATCH_SIZES, s["ceiling_seconds"], s["ceiling_repeats"]
            )
            result["ceilings"][model] = {"rows": ceiling, **info}
            result["models"][model] = {
                "description": DESCRIPTIONS.get(model, ""),
                "file_mb": model_file.stat().st_size / 1e6,
                "max_batch_size": config.max_batch_size,
                "max_queue_delay_us": config.dynamic_batching.max_queue_delay_us,
                "instances": sum(g.count for g in config.instance_group),
                "threads": info["threads"],
            }
            series = [("batching on", model, s["mode"]), ("batching off", model + NOBATCH, s["mode"])]
            if model == "identity":
                series.append(("stream, batching on", model, "stream"))
            for label, name, mode in series:
                ctx.log(f"{model}: {label} ({name}), concurrency {s['concurrency']}")
                levels = ctx.sweep(
                    server,
                    name,
                    label=label,
                    concurrency=s["concurrency"],
                    modes=[mode],
                    timing=s["timing"],
                    ceiling=ceiling,
                )
                result["levels"] += [{**level, "model_group": model} for level in levels]
    return result


def _closed_loop_level(levels: list[dict[str, Any]], model: str, series: str, concurrency: int) -> dict | None:
    return find_row(levels, model_group=model, series=series, concurrency=concurrency)


def render_closed_loop(result: dict[str, Any], page: Page) -> str:
    """Method, models, batching on vs off with its target, the plot, every level, the ceilings."""
    s, levels, conc = result["settings"], result["levels"], result["settings"]["concurrency"]
    t = s["timing"]
    lines = [
        "Closed loop (`tensorwire bench`, unary calls from asyncio tasks): N requests in flight, each worker "
        f"sending its next request when its last one is answered. Per level: {t['warmup_s']:g} s warm-up, then "
        f"{t['window_s']:g} s windows until {t['stable_windows']} consecutive windows agree within "
        f"±{t['stability_pct']:g} % (at most {t['max_windows']} windows); the numbers cover those last windows. "
        "Latency is the client's; avg batch, queue and compute come from the server's ModelStatistics over the "
        "same windows (avg batch = Δinference_count / Δexecution_count; compute = input + infer + output of the "
        "batch a request ran in); server and client CPU in cores busy (psutil). Client and server share the "
        "machine's cores: these are end-to-end numbers for one machine.",
        "",
        "**Ceiling**: `session.run` in a closed loop in one process, no server, same model file, same intra-op "
        "threads and sessions as the server gives the model. Efficiency = served samples/s ÷ the best ceiling "
        "among the batch sizes a level could form (≤ concurrency; 1 with batching off). **Batching off**: the "
        "same model file served as `<name>_nobatch` with `dynamic_batching.enabled = false`.",
        "",
        "### Models",
        "",
        "| model | what | max batch | queue delay | instances × threads |",
        "|---|---|---:|---:|---|",
    ]
    for name, info in result["models"].items():
        lines.append(
            f"| `{name}` | {info['description']} | {info['max_batch_size']} "
            f"| {info['max_queue_delay_us']} µs | {info['instances']} × {info['threads']} |"
        )
    lines += [f"| `{name}` | **skipped**: {why} | | | |" for name, why in result.get("skipped", {}).items()]
    last = conc[-1]
    lines += [
        "",
        "### Batching on vs off",
        "",
        "Samples/s with batching on / off (gain), and p99 latency at the highest concurrency.",
        "",
        "| model | " + " | ".join(f"c={c}" for c in conc) + f" | p99 at c={last}: on / off |",
        "|---|" + "---:|" * (len(conc) + 1),
    ]
    for model in result["models"]:
        cells = []
        for c in conc:
            on = _closed_loop_level(levels, model, "batching on", c)
            off = _closed_loop_level(levels, model, "batching off", c)
            if not on or not off:
                cells.append("–")
                continue
            a, b = on["throughput_samples_per_s"], off["throughput_samples_per_s"]
            cells.append(f"{a:,.0f} / {b:,.0f} ({a / b:.1f}×)" if b else f"{a:,.0f} / 0")
        on = _closed_loop_level(levels, model, "batching on", last)
        off = _closed_loop_level(levels, model, "batching off", last)
        p99 = f"{fmt(on and on['latency_p99_ms'], '{:.1f}')} / {fmt(off and off['latency_p99_ms'], '{:.1f}')} ms"
        lines.append(f"| `{model}` | " + " | ".join(cells) + f" | {p99} |")
    on = _closed_loop_level(levels, "wide_mlp", "batching on", 64)
    off = _closed_loop_level(levels, "wide_mlp", "batching off", 64)
    if on and off and off["throughput_samples_per_s"]:
        gain = on["throughput_samples_per_s"] / off["throughput_samples_per_s"]
        met = gain >= 5 and on["latency_p99_ms"] < off["latency_p99_ms"]
        lines += [
            "",
            "**Target** (wide MLP at concurrency 64: batching on ≥ 5× batching off, at a lower p99): "
            f"{gain:.1f}×, p99 {on['latency_p99_ms']:.0f} vs {off['latency_p99_ms']:.0f} ms: "
            f"{'met' if met else '**not met**'}.",
        ]
    try:
        from tensorwire.loadtest.plot import plot_levels

        png = plot_levels(
            levels, page.asset(".png"), title="tensorwire: throughput (solid), p99 (dashed), ceiling (dotted)"
        )
        lines += ["", f"![throughput and p99 against concurrency, per model]({page.link(png)})"]
    except Exception as err:  # matplotlib missing: the tables still get written
        lines += ["", f"(no plot: {err})"]
    lines += ["", "### Every level", ""]
    for model in result["models"]:
        rows = [r for r in levels if r.get("model_group") == model]
        lines += [f"#### `{model}`", "", report.markdown_table(rows, SWEEP_COLUMNS), ""]
    ceilings = result["ceilings"]
    sizes = sorted({r["batch_size"] for c in ceilings.values() for r in c["rows"]})
    lines += [
        "### Ceiling: ONNX Runtime alone, samples/s by batch size",
        "",
        "| model | threads × sessions | " + " | ".join(f"b={b}" for b in sizes) + " |",
        "|---|---|" + "---:|" * len(sizes),
    ]
    for model, ceiling in ceilings.items():
        by_size = {r["batch_size"]: r["samples_per_s"] for r in ceiling["rows"]}
        lines.append(
            f"| `{model}` | {ceiling['threads']} × {ceiling['replicas']} | "
            + " | ".join(fmt(by_size.get(b)) for b in sizes)
            + " |"
        )
    lines += [
        "",
        f"Each point: the median of {s['ceiling_repeats']} windows of {s['ceiling_seconds']:g} s after a "
        "warm-up (`python -m tensorwire.loadtest.ceiling`).",
    ]
    return "\n".join(lines)


# =========================================================================== load-generators


def _locust(address: str, users: int, seconds: int, stream: bool, out: Path) -> dict[str, Any]:
    """locust headless against identity; the locustfile's --summary-json totals as a row."""
    name = f"locust, {users} users, 1 process" + (", `--stream`" if stream else "")
    if not locust_command().exists():
        return {"generator": name, "error": "locust is not installed (the loadtest extra)"}
    args = ["--model", "identity", *(["--stream"] if stream else [])]
    summary, done = run_headless(address, *args, users=users, seconds=seconds, workdir=out, timeout_s=seconds + 90)
    if summary is None:
        return {"generator": name, "error": f"locust exited {done.returncode}: {done.stderr.strip()[-300:]}"}
    total = summary["total"]
    if not total["requests"]:
        return {"generator": name, "error": f"no request completed in {seconds} s (locust started too slowly?)"}
    return {
        "generator": name,
        "in_flight": users,
        "throughput_rps": total["requests_per_s"],
        "latency_p50_ms": total["p50_ms"],
        "latency_p99_ms": total["p99_ms"],
        "failures": f"{total['failures']} of {total['requests']:,}",
        "command": f"locust -f loadtest/locustfile.py --headless -u {users} -r {users} -t {seconds}s --host {address} "
        + " ".join(args),
    }


def measure_load_generators(ctx: Context) -> dict[str, Any]:
    """identity at one concurrency through each load generator, unary and streams: req/s, p50/p99 ms, failures."""
    c, seconds = ctx.pick(64, 4), ctx.pick(20, 5)
    repo = ctx.repo("load-generators", ["identity"])
    rows: list[dict[str, Any]] = []
    with ctx.server(repo, models=["identity"]) as server:
        for mode in ("async", "stream"):
            (level,) = ctx.sweep(
                server, "identity", label=mode, concurrency=[c], modes=[mode], timing=ctx.pick(*TIMING)
            )
            rows.append(
                {
                    "generator": f"`tensorwire bench --mode {mode}`",
                    "in_flight": c,
                    "throughput_rps": level["throughput_rps"],
                    "latency_p50_ms": level["latency_p50_ms"],
                    "latency_p99_ms": level["latency_p99_ms"],
                    "failures": str(level["errors"]),
                }
            )
        for stream in (False, True):
            ctx.log(f"locust: {c} users against identity for {seconds} s" + (", streams" if stream else ""))
            rows.append(_locust(server.address, c, seconds, stream, ctx.out_dir()))
        try:
            ctx.require_perf_analyzer()
        except Skipped as why:
            rows.append({"generator": "Triton perf_analyzer", "error": str(why)})
        else:
            for streaming in (False, True):
                timing = ctx.pick(
                    {"measurement_interval_ms": 2000, "stability_pct": 30, "retry_stability_pct": 100, "max_trials": 8},
                    PA_TIMING[1],
                )
                row = ctx.perf_analyzer(PerfAnalyzerRun("identity", c, streaming=streaming, **timing), server)
                name = f"Triton perf_analyzer, gRPC {'`--streaming`' if streaming else '`--async`'}"
                rows.append({"generator": name, "in_flight": c, "failures": "0", **row})
    return {"concurrency": c, "locust_seconds": seconds, "rows": rows}


def render_load_generators(result: dict[str, Any], page: Page) -> str:
    """One table, a row per load generator, and the commands."""
    lines = [
        "One `tensorwire serve` with the identity model; each load generator keeps the same number of "
        "requests in flight, one after the other, unary and over `ModelStreamInfer` streams.",
        "",
        "| load generator | in flight | req/s | p50 ms | p99 ms | failures |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['generator']} | – | – | – | – | {r['error']} |")
            continue
        lines.append(
            f"| {r['generator']} | {r['in_flight']} | {fmt(r['throughput_rps'])} "
            f"| {fmt(r['latency_p50_ms'], '{:.2f}')} | {fmt(r['latency_p99_ms'], '{:.2f}')} | {r['failures']} |"
        )
    lines += [
        "",
        "locust rounds its percentiles to whole milliseconds. Its users are gevent greenlets calling the "
        "blocking SDK (made cooperative by `grpc.experimental.gevent.init_gevent()`), all in one process "
        "that needs its own share of the cores; with `--stream` each user sends on its own stream.",
    ]
    commands = [r["command"] for r in result["rows"] if r.get("command")]
    if commands:
        lines += ["", "Commands (address of that run):", "", "```bash", *commands, "```"]
    return "\n".join(lines)


# =========================================================================== serving-time

PROFILE_RATE = 250


def summarize_profile(raw: str, top: int = 15) -> tuple[int, list[dict[str, Any]]]:
    """py-spy's collapsed stacks -> (samples, the functions most often on top of the stack).

    Line numbers are dropped, so a function's lines add up. With ``--gil`` every sample is a moment when
    some thread held the GIL: the list says what the GIL was busy with.
    """
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])
        total += int(count)
        own[leaf] += int(count)
    return total, [{"function": name, "samples": n, "share": n / total} for name, n in own.most_common(top)]


def _profile(ctx: Context, server, concurrency: int, seconds: int) -> dict[str, Any]:
    """``py-spy record --gil`` on the server while identity runs at ``concurrency`` (a level of its own:
    py-spy costs CPU)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return {"error": "py-spy is not installed"}
    out = ctx.out_dir() / "server-profile.txt"
    holder: dict[str, Any] = {}
    timing = {"warmup_s": 0.5, "window_s": seconds + 1, "stable_windows": 1, "max_windows": 1}
    runner = threading.Thread(
        target=lambda: holder.update(
            levels=ctx.sweep(server, "identity", label="profiled", concurrency=[concurrency], timing=timing)
        ),
        daemon=True,
    )
    runner.start()
    time.sleep(1.0)
    spy = subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(server.pid),
            "--duration",
            str(seconds),
            "--rate",
            str(PROFILE_RATE),
            "--format",
            "raw",
            "--gil",
            "--nonblocking",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    runner.join()
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy exited {spy.returncode}: {spy.stderr.strip()[-300:]}"}
    samples, top = summarize_profile(out.read_text())
    level = (holder.get("levels") or [{}])[0]
    return {
        "top": top,
        "samples": samples,
        "gil_busy": samples / (PROFILE_RATE * seconds),
        "seconds": seconds,
        "throughput_rps": level.get("throughput_rps"),
    }


def measure_serving_time(ctx: Context) -> dict[str, Any]:
    """identity at concurrency 64: one closed-loop level (CPU µs per request on both sides) and a py-spy profile."""
    c = ctx.pick(64, 4)
    repo = ctx.repo("serving-time", ["identity"])
    with ctx.server(repo, models=["identity"]) as server:
        (level,) = ctx.sweep(server, "identity", label="async", concurrency=[c], timing=ctx.pick(*TIMING))
        ctx.log(f"profile: py-spy on the server, identity at concurrency {c}")
        profile = _profile(ctx, server, c, ctx.pick(8, 2))
    return {"concurrency": c, "level": level, "cores": report.usable_cores(), "profile": profile}


def render_serving_time(result: dict[str, Any], page: Page) -> str:
    """The CPU arithmetic, what held the GIL, and the hand-written notes (``benchmarks_notes.md``)."""
    level, cores, c = result["level"], result["cores"], result["concurrency"]
    text = (
        f"identity at concurrency {c} (`tensorwire bench --mode async`): {fmt(level['throughput_rps'])} req/s. "
        f"CPU per request: server {fmt(level['server_cpu_us_per_request'])} µs, client "
        f"{fmt(level['client_cpu_us_per_request'])} µs. The server's own accounting per request: queue "
        f"{fmt(level['server_queue_us'])} µs, compute {fmt(level['server_compute_us'])} µs, whole request "
        f"{fmt(level['server_request_us'])} µs; average batch {fmt(level['server_avg_batch'], '{:.1f}')}."
    )
    server_us, client_us = level["server_cpu_us_per_request"], level["client_cpu_us_per_request"]
    if server_us and client_us:
        text += (
            f" With no model compute at all, {cores} cores can serve at most about {cores} ÷ ({server_us:,.0f} "
            f"+ {client_us:,.0f}) µs ≈ {cores / (server_us + client_us) * 1e6:,.0f} req/s with client and "
            f"server sharing the machine. The server itself used {fmt(level['server_cpu_cores'], '{:.2f}')} "
            "cores here: one event-loop thread holding the GIL plus gRPC's own threads, so moving the client "
            "elsewhere would not double it."
        )
    lines = [text]
    profile = result["profile"]
    if "top" in profile:
        lines += [
            "",
            f"py-spy (`record --gil --nonblocking`, {PROFILE_RATE} Hz) on the server for {profile['seconds']} s "
            f"while identity ran at concurrency {c} ({fmt(profile.get('throughput_rps'))} req/s while sampled): a "
            f"thread held the GIL in **{profile['gil_busy']:.0%}** of the samples. What held it (the function on "
            "top of the stack, lines merged; `Handle._run` on top means C/Cython code called from an event-loop "
            "callback, which in this server is grpcio's asyncio binding):",
            "",
            "| function | share of GIL-held samples |",
            "|---|---:|",
        ]
        lines += [f"| `{e['function']}` | {e['share']:.1%} |" for e in profile["top"]]
    else:
        lines += ["", f"Profile: {profile['error']}"]
    if NOTES.is_file():
        lines += ["", NOTES.read_text().strip()]
    return "\n".join(lines)


# =========================================================================== perf-analyzer

TARGET_CEILING_PCT = 50.0
TARGET_IDENTITY_RPS = 3500.0
LATENCY_ALLOWANCE_MS = 0.5


def _perf_analyzer_method(settings: dict[str, Any], how: str = "--async") -> str:
    retry = settings.get("retry_stability_pct")
    rerun = f" (a level not stable within {settings['stability_pct']} % is rerun once with `-s {retry}`, marked)"
    return (
        f"perf_analyzer 2.51.0 (`loadtest/perf_analyzer.sh`), one process per level, read from its CSV report: "
        f"`-i grpc {how} -b 1 --concurrency-range C --input-data <perf_inputs>/<model>.json "
        f"-s {settings['stability_pct']} --measurement-interval {settings['measurement_interval_ms']} "
        f"--max-trials {settings['max_trials']}`{rerun if retry else ''}. infer/s, p50 and p99 are "
        "perf_analyzer's; avg batch = the server's Δinference_count / Δexecution_count over the whole run; "
        "CPU = the process's CPU seconds over the run's wall time (the server's process tree by psutil, "
        "perf_analyzer's from its rusage), µs/request = server CPU ÷ throughput."
    )


def measure_perf_analyzer(ctx: Context) -> dict[str, Any]:
    """In-process ceilings first (no server), then perf_analyzer at each concurrency for identity and the CNN;
    the targets computed from those numbers."""
    ctx.require_perf_analyzer()
    s = {**ctx.pick(*PA_TIMING), "concurrency": ctx.pick([1, 4, 16, 64], [1, 4])}
    timing = {"seconds": ctx.pick(1.0, 0.1), "repeats": ctx.pick(2, 1), "warmup_s": ctx.pick(0.2, 0.05)}
    repo = ctx.repo("perf-analyzer", ["identity", "cnn"])
    files = {m: latest_model_file(repo, m)[0] for m in ("identity", "cnn")}
    ctx.log("in-process ceilings: cnn at every batch size with 1 and 2 threads, identity at batch 1")
    in_process = {
        "ceiling": measure_ceiling(files["cnn"], BATCH_SIZES, (1, 2), **timing),
        "identity": measure_ceiling(files["identity"], (1,), (1, 2), **timing),
        "timing": timing,
    }
    levels: dict[str, list[dict[str, Any]]] = {}
    pa = {k: v for k, v in s.items() if k != "concurrency"}
    with ctx.server(repo, models=["identity", "cnn"]) as server:
        for model in ("identity", "cnn"):
            levels[model] = [ctx.perf_analyzer(PerfAnalyzerRun(model, c, **pa), server) for c in s["concurrency"]]
    result = {
        "settings": s,
        "in_process": in_process,
        "levels": levels,
        "file_bytes": {m: f.stat().st_size for m, f in files.items()},
    }
    result["targets"] = _perf_analyzer_targets(result)
    return result


def _perf_analyzer_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    top = max(result["settings"]["concurrency"])
    levels, in_process = result["levels"], result["in_process"]
    note = "" if top == 64 else f" (quick run: c={top}; the target is defined at c=64)"
    targets = []
    ceiling_2t = _best(in_process["ceiling"], threads=2)
    cnn_top = find_row(levels["cnn"], concurrency=top)
    value = 100 * cnn_top["throughput_rps"] / ceiling_2t["samples_per_s"] if ceiling_2t and cnn_top else None
    text = (
        f"CNN at c={top} = {value:.0f} % of the 2-thread ceiling ({cnn_top['throughput_rps']:,.0f} of "
        f"{ceiling_2t['samples_per_s']:,.0f} samples/s, best at batch {ceiling_2t['batch_size']})"
        if value is not None
        else f"CNN at c={top}: not measured"
    )
    targets.append(
        {
            "name": "cnn_vs_2thread_ceiling",
            "text": f"{text} (target ≥ {TARGET_CEILING_PCT:.0f} %){note}",
            "value_pct": value,
            "met": None if value is None else value >= TARGET_CEILING_PCT,
        }
    )
    identity_top = find_row(levels["identity"], concurrency=top)
    value = identity_top["throughput_rps"] if identity_top else None
    text = f"identity at c={top} = {value:,.0f} req/s" if value is not None else f"identity at c={top}: not measured"
    targets.append(
        {
            "name": "identity_throughput",
            "text": f"{text} (target ≥ {TARGET_IDENTITY_RPS:,.0f}){note}",
            "value_rps": value,
            "met": None if value is None else value >= TARGET_IDENTITY_RPS,
        }
    )
    for model, rows in (("identity", in_process["identity"]), ("cnn", in_process["ceiling"])):
        best, c1 = _best(rows, batch_size=1), find_row(levels[model], concurrency=1)
        in_ms = 1e3 / best["batches_per_s"] if best else None
        limit = None if in_ms is None else in_ms + LATENCY_ALLOWANCE_MS
        p50 = c1["latency_p50_ms"] if c1 else None
        if p50 is not None and limit is not None:
            text = (
                f"{model} c=1 p50 = {p50:.3f} ms vs in-process batch-1 latency {in_ms:.3f} ms "
                f"({best['threads']} thread{'s' if best['threads'] > 1 else ''}) + {LATENCY_ALLOWANCE_MS} ms "
                f"= {limit:.3f} ms (overhead {p50 - in_ms:.3f} ms)"
            )
        else:
            text = f"{model} c=1 p50 vs in-process batch-1 latency + {LATENCY_ALLOWANCE_MS} ms: not measured"
        targets.append(
            {
                "name": f"{model}_c1_latency",
                "text": text,
                "p50_ms": p50,
                "in_process_ms": in_ms,
                "limit_ms": limit,
                "met": None if p50 is None or limit is None else p50 <= limit,
            }
        )
    return targets


def _ceiling_table(rows: list[dict[str, Any]]) -> list[str]:
    threads = sorted({r["threads"] for r in rows})
    head = "| batch | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}: samples/s | p50 ms" for t in threads) + " |"
    lines = [head, "|---:|" + "---:|---:|" * len(threads)]
    for batch in sorted({r["batch_size"] for r in rows}):
        cells = []
        for t in threads:
            r = next((x for x in rows if x["threads"] == t and x["batch_size"] == batch), None)
            cells += [fmt(r and r["samples_per_s"]), fmt(r and r["latency_ms_p50"], "{:.3f}")]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def render_perf_analyzer(result: dict[str, Any], page: Page) -> str:
    """Method, a table per model, the CNN ceiling table, the targets."""
    lines = [_perf_analyzer_method(result["settings"]), ""]
    for model in ("identity", "cnn"):
        lines += [
            f"### {model} ({_size(result['file_bytes'][model])} model file)",
            "",
            *pa_table(result["levels"][model], [("concurrency", "concurrency", "{}")]),
            "",
        ]
    timing = result["in_process"]["timing"]
    lines += [
        f"### In-process ceiling: cnn (ONNX Runtime alone, median of {timing['repeats']} × "
        f"{timing['seconds']} s, measured before the server started)",
        "",
        *_ceiling_table(result["in_process"]["ceiling"]),
        "",
        "identity in process, batch 1: "
        + ", ".join(
            f"{r['threads']} thread{'s' if r['threads'] > 1 else ''} {r['batches_per_s']:,.0f} calls/s "
            f"(p50 {r['latency_ms_p50'] * 1e3:.0f} µs)"
            for r in result["in_process"]["identity"]
        ),
        "",
        "### Targets",
        "",
    ]
    lines += [f"- {t['text']}: **{outcome(t['met'])}**" for t in result["targets"]]
    return "\n".join(lines)


# =========================================================================== bare-baseline

#: the servers compared, in the order measured at each level; a variant (--workers 2) is one more entry
BASELINE_SERVERS = (BARE, TENSORWIRE)
BASELINE_MODELS = ("identity", "cnn")


def measure_bare_baseline(ctx: Context) -> dict[str, Any]:
    """Each (model, concurrency, unary/stream) level against every server in turn, all servers up at once (idle
    ones cost nothing), so the ratios come from the same minutes; the CNN's ceiling first, with no server."""
    ctx.require_perf_analyzer()
    s = {**ctx.pick(*PA_TIMING), "concurrency": ctx.pick([1, 64], [1, 4]), "ceiling_threads": 2}
    repo = ctx.repo("bare-baseline", list(BASELINE_MODELS))
    ctx.log("in-process ceiling: cnn, 2 threads, every batch size")
    ceiling = measure_ceiling(
        latest_model_file(repo, "cnn")[0],
        ctx.pick(BATCH_SIZES, (1, 4)),
        (s["ceiling_threads"],),
        seconds=ctx.pick(1.0, 0.05),
        repeats=ctx.pick(2, 1),
    )
    pa = {k: v for k, v in s.items() if k not in ("concurrency", "ceiling_threads")}
    rows = []
    with contextlib.ExitStack() as running:
        servers = [(spec, running.enter_context(ctx.server(repo, spec, BASELINE_MODELS))) for spec in BASELINE_SERVERS]
        for model in BASELINE_MODELS:
            for c in s["concurrency"]:
                for streaming in (False, True):
                    for spec, server in servers:
                        row = ctx.perf_analyzer(PerfAnalyzerRun(model, c, streaming=streaming, **pa), server)
                        rows.append({**row, "server": spec.label})
    result = {
        "settings": s,
        "servers": [spec.label for spec in BASELINE_SERVERS],
        "ceiling": ceiling,
        "cores": report.usable_cores(),
        "rows": rows,
    }
    result["targets"] = _baseline_targets(result)
    return result


def _baseline_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows, top = result["rows"], max(result["settings"]["concurrency"])
    bare, ours = BARE.label, TENSORWIRE.label
    note = "" if top == 64 else f" (quick run: c={top}; defined at c=64)"
    best = _best(result["ceiling"])
    targets = []

    def ratio(name: str, text: str, a: dict | None, b: dict | None, target: float) -> None:
        value = a["throughput_rps"] / b["throughput_rps"] if a and b and b["throughput_rps"] else None
        targets.append(
            {
                "name": name,
                "text": f"{text}: {fmt(value, '{:.2f}')}× (target ≥ {target}×){note}",
                "value": value,
                "met": None if value is None else value >= target,
            }
        )

    ratio(
        "identity_unary_vs_bare",
        f"identity c={top} unary, tensorwire ÷ bare",
        find_row(rows, server=ours, model="identity", concurrency=top, mode="unary"),
        find_row(rows, server=bare, model="identity", concurrency=top, mode="unary"),
        1.0,
    )
    ratio(
        "identity_stream_vs_bare_unary",
        f"identity c={top}, tensorwire stream ÷ bare unary",
        find_row(rows, server=ours, model="identity", concurrency=top, mode="stream"),
        find_row(rows, server=bare, model="identity", concurrency=top, mode="unary"),
        1.8,
    )
    for mode, target in (("unary", 55.0), ("stream", 65.0)):
        row = find_row(rows, server=ours, model="cnn", concurrency=top, mode=mode)
        value = 100 * row["throughput_rps"] / best["samples_per_s"] if row and best else None
        targets.append(
            {
                "name": f"cnn_{mode}_vs_ceiling",
                "value": value,
                "text": f"CNN c={top} {mode}: {fmt(value)} % of the {result['settings']['ceiling_threads']}-"
                f"thread ceiling (target ≥ {target:.0f} %){note}",
                "met": None if value is None else value >= target,
            }
        )
    for model in BASELINE_MODELS:
        a = find_row(rows, server=ours, model=model, concurrency=1, mode="unary")
        b = find_row(rows, server=bare, model=model, concurrency=1, mode="unary")
        value = a["latency_p50_ms"] - b["latency_p50_ms"] if a and b else None
        targets.append(
            {
                "name": f"{model}_c1_p50",
                "value": value,
                "text": f"{model} c=1 unary p50: tensorwire − bare = {fmt(value, '{:+.2f}')} ms (target ≤ 0.1 ms)",
                "met": None if value is None else value <= 0.1,
            }
        )
    return targets


def render_bare_baseline(result: dict[str, Any], page: Page) -> str:
    """Both servers, level by level, with server CPU per request and the ratio to the bare server; the targets."""
    best = _best(result["ceiling"])
    threads = result["settings"]["ceiling_threads"]
    lines = [
        "The same reference models served by tensorwire (their config.toml: identity 1 replica × 1 thread, the "
        "CNN 2 × 1) and by `loadtest/bare_server.py`, the simplest correct v2 server in Python: one grpc.aio "
        "event loop, one ONNX Runtime session per model with "
        f"{result['cores']} intra-op threads (the usable cores), one `session.run` per request in the handler, no "
        "batching, no statistics. Both servers run at once; at each level perf_analyzer measures one, then the "
        "other.",
        "",
        _perf_analyzer_method(result["settings"], how="--async|--streaming"),
        "",
    ]
    rows = []
    for r in result["rows"]:
        base = find_row(result["rows"], server=BARE.label, model=r["model"], concurrency=r["concurrency"], mode="unary")
        share = r["throughput_rps"] / base["throughput_rps"] if base and "error" not in r else None
        rows.append({**r, "vs_bare": share})
    lead = [
        ("model", "model", "{}"),
        ("concurrency", "conc.", "{}"),
        ("mode", "mode", "{}"),
        ("server", "server", "{}"),
    ]
    lines += pa_table(rows, lead, [("vs_bare", "÷ bare unary", "{:.2f}×")])
    if best:
        lines += [
            "",
            f"CNN in-process ceiling, ONNX Runtime alone with {threads} threads, measured in the same run "
            f"before the servers started: {best['samples_per_s']:,.0f} samples/s (best at batch "
            f"{best['batch_size']}).",
        ]
    lines += ["", "Targets:", ""] + [f"- {t['text']}: **{outcome(t['met'])}**" for t in result["targets"]]
    return "\n".join(lines)


# =========================================================================== many-connections

#: the servers compared when many clients connect (front-end processes share the port: see "workers")
MANY_CONNECTIONS_SERVERS = (BARE, TENSORWIRE, TENSORWIRE.with_args("--workers", "2"))


def measure_many_connections(ctx: Context) -> dict[str, Any]:
    """identity, unary, with several perf_analyzer processes at once (each its own connections) against each
    server: total infer/s, p50/p99 ms, server CPU µs per request. One perf_analyzer opens about 3 TCP
    connections; an application behind a load balancer opens many, which is what spreads over processes that
    share a port (SO_REUSEPORT spreads connections, not requests)."""
    ctx.require_perf_analyzer()
    processes, concurrency = ctx.pick(4, 2), ctx.pick(16, 2)
    repo = ctx.repo("many-connections", ["identity"])
    rows = []
    with contextlib.ExitStack() as running:
        servers = [(s, running.enter_context(ctx.server(repo, s, ["identity"]))) for s in MANY_CONNECTIONS_SERVERS]
        for spec, server in servers:
            run = PerfAnalyzerRun("identity", concurrency, processes=processes, **ctx.pick(*PA_TIMING))
            rows.append({**ctx.perf_analyzer(run, server), "server": spec.label})
    return {"processes": processes, "concurrency": concurrency, "settings": ctx.pick(*PA_TIMING), "rows": rows}


def render_many_connections(result: dict[str, Any], page: Page) -> str:
    """One row per server: the processes' summed throughput and the server's CPU per request."""
    n, c = result["processes"], result["concurrency"]
    lines = [
        f"{n} perf_analyzer processes at once, each `-i grpc --async --concurrency-range {c}` on identity "
        f"({n * c} requests in flight over about {3 * n} connections); infer/s is their sum, p50 the mean of "
        "theirs, p99 the largest. Same perf_analyzer settings as above.",
        "",
    ]
    return "\n".join([*lines, *pa_table(result["rows"], [("server", "server", "{}")])])


# =========================================================================== int8-served

INT8_BATCHES = (1, 32)
TARGET_INT8_SERVED = 1.3
TARGET_INT8_IN_PROCESS = 1.8


def measure_int8_served(ctx: Context) -> dict[str, Any]:
    """The FP32 and INT8 CNN: top-1 agreement, in-process samples/s at batch 1 and 32 (1 thread), served
    infer/s with perf_analyzer; INT8 ÷ FP32 ratios against their targets."""
    ctx.require_perf_analyzer()
    from tensorwire.loadtest.ceiling import make_session
    from tensorwire.loadtest.reference_models import sample_inputs

    c = ctx.pick(64, 4)
    models = ("cnn", CNN_INT8)
    repo = ctx.repo("int8-served", list(models))
    files = {m: latest_model_file(repo, m)[0] for m in models}
    x = sample_inputs("cnn", 256, 2)  # fresh samples: neither the perf inputs (seed 0) nor the calibration (1)
    a, b = (make_session(files[m], 1).run(None, {"INPUT0": x})[0] for m in models)
    timing = {"seconds": ctx.pick(1.0, 0.1), "repeats": ctx.pick(2, 1), "warmup_s": ctx.pick(0.2, 0.05)}
    ctx.log(f"in-process: cnn and {CNN_INT8} at batch {INT8_BATCHES}, 1 thread")
    in_process = [row for m in models for row in measure_ceiling(files[m], INT8_BATCHES, (1,), **timing)]
    with ctx.server(repo, models=models) as server:
        served = [ctx.perf_analyzer(PerfAnalyzerRun(m, c, **ctx.pick(*PA_TIMING)), server) for m in models]
    result = {
        "concurrency": c,
        "in_process": in_process,
        "served": served,
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
        "file_bytes": {m: f.stat().st_size for m, f in files.items()},
    }
    fp32, int8 = (find_row(served, model=m) for m in models)
    by = {(r["model"], r["batch_size"]): r["samples_per_s"] for r in in_process}
    ratios = [
        (
            "served",
            f"served at c={c}",
            int8["throughput_rps"] / fp32["throughput_rps"] if fp32 and int8 else None,
            TARGET_INT8_SERVED,
        )
    ]
    ratios += [
        (
            f"in_process_batch{n}",
            f"in-process batch {n}, 1 thread",
            by[(CNN_INT8, n)] / by[("cnn", n)],
            TARGET_INT8_IN_PROCESS,
        )
        for n in INT8_BATCHES
    ]
    result["ratios"] = [
        {"name": n, "text": t, "ratio": r, "target": g, "met": None if r is None else r >= g} for n, t, r, g in ratios
    ]
    return result


def render_int8_served(result: dict[str, Any], page: Page) -> str:
    """One table and the ratios."""
    from tensorwire.loadtest.harness import CALIBRATION_SAMPLES, CALIBRATION_SEED

    c = result["concurrency"]
    lines = [
        f"`{CNN_INT8}`: static QDQ quantization of the CNN (per-channel int8 weights, uint8 activations, MinMax "
        f"calibration on {CALIBRATION_SAMPLES} samples like the perf inputs: standard normal clipped to [-3, 3], "
        f"seed {CALIBRATION_SEED}); top-1 agreement with FP32 on 256 fresh samples "
        f"{result['top1_agreement']:.1%}. Same config.toml as `cnn`. Served: perf_analyzer as above, "
        f"concurrency {c}.",
        "",
    ]
    by = {(r["model"], r["batch_size"]): r["samples_per_s"] for r in result["in_process"]}
    rows = [
        {
            **r,
            "file": _size(result["file_bytes"][r["model"]]),
            **{f"b{n}": by.get((r["model"], n)) for n in INT8_BATCHES},
        }
        for r in result["served"]
    ]
    extra = [(f"b{n}", f"in-process b{n} samples/s (1 thread)", "{:,.0f}") for n in INT8_BATCHES]
    lines += pa_table(rows, [("model", "model", "{}"), ("file", "file", "{}")], extra)
    lines += ["", "INT8 / FP32:", ""]
    lines += [
        f"- {r['text']}: {fmt(r['ratio'], '{:.2f}')}× (target ≥ {r['target']}×): **{outcome(r['met'])}**"
        for r in result["ratios"]
    ]
    return "\n".join(lines)


# =========================================================================== sdk-overhead


def measure_sdk_overhead(ctx: Context) -> dict[str, Any]:
    """:func:`tensorwire.loadtest.sdk_overhead.measure` against a tensorwire server for identity."""
    from tensorwire.loadtest import sdk_overhead

    repo = ctx.repo("sdk-overhead", ["identity"])
    sizes = ctx.pick(
        {"calls": 200, "rounds": 31, "concurrency": 16, "requests": 2000, "throughput_rounds": 7},
        {"calls": 20, "rounds": 3, "concurrency": 4, "requests": 200, "throughput_rounds": 1},
    )
    with ctx.server(repo, models=["identity"]) as server:
        return sdk_overhead.measure(server.address, "identity", server_pid=server.pid, **sizes)


def render_sdk_overhead(result: dict[str, Any], page: Page) -> str:
    """The command and :func:`tensorwire.loadtest.sdk_overhead.render`."""
    from tensorwire.loadtest import sdk_overhead

    return (
        f"Command: `python -m tensorwire.loadtest.sdk_overhead --model identity --calls {result['calls']} "
        f"--rounds {result['rounds']} --concurrency {result['concurrency']} --requests {result['requests']} "
        f"--throughput-rounds {result['throughput_rounds']} --server-pid PID` against `tensorwire serve` on the "
        f"identity reference model.\n\n{sdk_overhead.render(result)}"
    )


# =========================================================================== the registry

register(
    Scenario(
        "closed-loop",
        "Closed-loop sweeps: batching on and off, against the in-process ceiling",
        measure_closed_loop,
        render_closed_loop,
        minutes=6,
    )
)
register(
    Scenario(
        "load-generators",
        "One server, several load generators (identity, unary and streams)",
        measure_load_generators,
        render_load_generators,
        needs=("locust", "perf_analyzer"),
        minutes=2,
    )
)
register(
    Scenario(
        "serving-time",
        "Where the serving time goes (identity)",
        measure_serving_time,
        render_serving_time,
        needs=("py-spy",),
        minutes=0.5,
    )
)
register(
    Scenario(
        "perf-analyzer",
        "perf_analyzer: serving overhead and the CNN against its in-process ceiling",
        measure_perf_analyzer,
        render_perf_analyzer,
        needs=("perf_analyzer",),
        minutes=3,
    )
)
register(
    Scenario(
        "bare-baseline",
        "tensorwire against a bare grpc.aio server (perf_analyzer, unary and streams)",
        measure_bare_baseline,
        render_bare_baseline,
        needs=("perf_analyzer",),
        minutes=5,
    )
)
register(
    Scenario(
        "many-connections",
        "Many connections: several perf_analyzer processes at once (identity)",
        measure_many_connections,
        render_many_connections,
        needs=("perf_analyzer",),
        minutes=1,
    )
)
register(
    Scenario(
        "workers",
        "Front-end processes: --workers 1 against --workers 2 (perf_analyzer, one and four clients)",
        workers_scaling.measure,
        workers_scaling.render,
        needs=("perf_analyzer",),
        minutes=12,
    )
)
register(
    Scenario(
        "http-frontend",
        "HTTP/REST next to gRPC (perf_analyzer, one server)",
        frontends.measure,
        frontends.render,
        needs=("perf_analyzer",),
        minutes=2,
    )
)
register(
    Scenario(
        "variable-length",
        "Variable-length requests: the Transformer with padding on and off (lengths 8-128, concurrency 64)",
        variable_length.measure,
        variable_length.render,
        minutes=2,
    )
)
register(
    Scenario(
        "int8-served",
        "Served INT8 against FP32 (the CNN, perf_analyzer)",
        measure_int8_served,
        render_int8_served,
        needs=("perf_analyzer",),
        minutes=1,
    )
)
register(
    Scenario(
        "sdk-overhead",
        "Client SDK overhead, and streams against unary calls",
        measure_sdk_overhead,
        render_sdk_overhead,
        minutes=1,
    )
)
register(
    command_scenario(
        "trainer-int8",
        "Trainer: INT8 against FP32 in process, DDP with 1 and 2 processes",
        "tensorwire.trainer.bench_int8",
        quick_args=("--seconds", "0.2", "--skip-fit", "--width", "8"),
        minutes=2,
    )
)
register(
    command_scenario(
        "trainer-compression",
        "Trainer: model compression (pruning, distillation, INT8)",
        "tensorwire.trainer.bench_compression",
        quick_args=("--quick",),
        minutes=11,
    )
)
