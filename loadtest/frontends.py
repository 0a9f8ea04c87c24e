"""HTTP next to gRPC: one tensorwire server, both front-ends, the same models, measured side by side.

A benchmark scenario (``measure(ctx)`` and ``render(result, page)``, see :mod:`tensorwire.loadtest.harness`):
perf_analyzer drives identity and the CNN at concurrency 1 and 64, over gRPC (``-i grpc --async``, unary)
and over HTTP (``-i http --async``, binary tensors: what perf_analyzer sends), one level after the other
on the same server so that both front-ends see the same minutes of a noisy machine. The table gives
throughput, latency, the server's CPU per request (its process tree, psutil, over the run) and the
average batch the server formed; the ratio line says what one HTTP request costs the server against a
gRPC one.

Run alone: ``python -m tensorwire.loadtest.benchmarks --only http-frontend`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tensorwire.loadtest import report
from tensorwire.loadtest.harness import TENSORWIRE, Context, Page
from tensorwire.loadtest.perf_analyzer import TIMING, PerfAnalyzerRun

#: the server under test: tensorwire with its HTTP front-end open
HTTP_SERVER = replace(TENSORWIRE, http=True, label="tensorwire (gRPC + HTTP)")
MODELS = ("identity", "cnn")
PROTOCOLS = ("grpc", "http")
#: the columns before the perf_analyzer ones (``report.PA_COLUMNS``)
LEAD = [("model", "model", "{}"), ("concurrency", "concurrency", "{}"), ("mode", "front-end", "{}")]


def measure(ctx: Context) -> dict[str, Any]:
    """Every (model, concurrency) level over gRPC, then at once over HTTP, on one server; JSON-able rows.

    Raises harness.Skipped when perf_analyzer cannot be set up here.
    """
    ctx.require_perf_analyzer()
    timing = ctx.pick(*TIMING)
    concurrency = ctx.pick([1, 64], [1, 4])
    repo = ctx.repo("http-frontend", list(MODELS))
    rows = []
    with ctx.server(repo, HTTP_SERVER, MODELS) as server:
        for model in MODELS:
            for c in concurrency:
                for protocol in PROTOCOLS:
                    rows.append(ctx.perf_analyzer(PerfAnalyzerRun(model, c, protocol=protocol, **timing), server))
    return {"settings": {**timing, "concurrency": concurrency}, "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, concurrency): HTTP's server CPU per request and throughput against gRPC's."""
    out = []
    for model in MODELS:
        for c in sorted({r["concurrency"] for r in rows}):
            pair = {r["mode"]: r for r in rows if r["model"] == model and r["concurrency"] == c and "error" not in r}
            grpc, http = pair.get("unary"), pair.get("http")
            if not (grpc and http and grpc.get("server_cpu_us_per_request") and http.get("server_cpu_us_per_request")):
                continue
            out.append(
                {
                    "model": model,
                    "concurrency": c,
                    "cpu_ratio": http["server_cpu_us_per_request"] / grpc["server_cpu_us_per_request"],
                    "throughput_ratio": http["throughput_rps"] / grpc["throughput_rps"],
                }
            )
    return out


def render(result: dict[str, Any], page: Page) -> str:
    """The method, one table of every level, and HTTP against gRPC per level."""
    s = result["settings"]
    lines = [
        "One `tensorwire serve` with both front-ends; perf_analyzer 2.51.0 (`loadtest/perf_analyzer.sh`) at each "
        f"level over gRPC (`-i grpc --async`, unary) and then over HTTP (`-i http --async`, binary tensors), "
        f"`-b 1 --input-data <perf_inputs>/<model>.json -s {s['stability_pct']} --measurement-interval "
        f"{s['measurement_interval_ms']} --max-trials {s['max_trials']}`. server µs/request = the server's CPU "
        "(process tree, psutil) ÷ throughput over the run; the same batcher and statistics serve both.",
        "",
    ]
    table_rows = [{**r, "mode": "gRPC" if r["mode"] == "unary" else "HTTP"} for r in result["rows"]]
    lines += report.pa_table(table_rows, LEAD)
    if result["ratios"]:
        lines += ["", "HTTP against gRPC, same server, same minutes:", ""]
        lines += [
            f"- {r['model']} c={r['concurrency']}: server CPU per request ×{r['cpu_ratio']:.2f}, "
            f"throughput ×{r['throughput_ratio']:.2f}"
            for r in result["ratios"]
        ]
    return "\n".join(lines)
