"""Tables and the machine's description for benchmark reports (markdown and, when available, rich)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from typing import Any

#: (JSON key, column title, format) for the summary table of a bench run
COLUMNS: list[tuple[str, str, str]] = [
    ("model", "model", "{}"),
    ("mode", "mode", "{}"),
    ("concurrency", "conc.", "{}"),
    ("throughput_rps", "req/s", "{:,.0f}"),
    ("throughput_samples_per_s", "samples/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p90_ms", "p90 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("errors", "errors", "{}"),
    ("server_avg_batch", "avg batch", "{:.1f}"),
    ("server_queue_us", "queue µs", "{:,.0f}"),
    ("server_compute_us", "compute µs", "{:,.0f}"),
    ("efficiency", "eff.", "{:.0%}"),
    ("client_cpu_cores", "client CPU", "{:.2f}"),
    ("server_cpu_cores", "server CPU", "{:.2f}"),
    ("stable", "stable", "{}"),
]


def fmt(value: Any, pattern: str = "{:,.0f}") -> str:
    """``value`` as a table cell: "–" for None, yes/**no** for booleans, else ``pattern`` (``str`` if it does
    not apply)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


def visible_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The columns that hold a value in at least one row."""
    return [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    columns = list(columns or visible_columns(rows))

    def first_value(key: str) -> Any:
        return next((r.get(key) for r in rows if r.get(key) is not None), "")

    numeric = [not isinstance(first_value(k), str) for k, _, _ in columns]
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def outcome(flag: bool | None) -> str:
    """A target's outcome in words: "met", "NOT met", or "not measured" (None)."""
    return "not measured" if flag is None else ("met" if flag else "NOT met")


def find_row(rows: Sequence[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    """The first row matching every ``key=value`` of ``where`` that was measured (has no ``error``), or None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in where.items()) and "error" not in r), None)


#: perf_analyzer rows (``tensorwire.loadtest.perf_analyzer.run``) as table columns, after a table's own lead ones
PA_COLUMNS: list[tuple[str, str, str]] = [
    ("throughput_rps", "infer/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("server_avg_batch", "server avg batch", "{:.2f}"),
    ("server_cpu_us_per_request", "server µs/request", "{:,.0f}"),
    ("server_cpu_cores", "server CPU (cores)", "{:.2f}"),
    ("perf_analyzer_cpu_cores", "perf_analyzer CPU (cores)", "{:.2f}"),
]


def pa_table(
    rows: Sequence[dict[str, Any]], lead: Sequence[tuple[str, str, str]], extra: Sequence[tuple[str, str, str]] = ()
) -> list[str]:
    """perf_analyzer rows as markdown table lines: the ``lead`` columns, :data:`PA_COLUMNS`, the ``extra``
    columns, and a note column where a level failed or needed a looser stability bound."""
    notes = []
    for r in rows:
        if "error" in r:
            notes.append({**r, "note": f"failed: {r['error']}"})
        else:
            retried = r.get("attempts", 1) > 1
            notes.append({**r, "note": f"stable only within {r['stability_pct']} %" if retried else None})
    columns = [*lead, *PA_COLUMNS, *extra]
    if any(r["note"] for r in notes):
        columns.append(("note", "note", "{}"))
    return markdown_table(notes, columns).splitlines()


def rich_table(rows: Sequence[dict[str, Any]], title: str | None = None):
    """A rich Table of the rows (raises ImportError without rich)."""
    from rich.table import Table

    columns = visible_columns(rows)
    table = Table(title=title, header_style="bold")
    for key, name, _ in columns:
        table.add_column(name, justify="left" if key in ("model", "mode") else "right")
    for row in rows:
        table.add_row(*(fmt(row.get(k), f).replace("**", "") for k, _, f in columns))
    return table


def knee(rows: Sequence[dict[str, Any]], fraction: float = 0.9) -> dict[str, Any] | None:
    """The lowest-concurrency row reaching ``fraction`` of the peak throughput (the knee)."""
    usable = [r for r in rows if r.get("throughput_rps")]
    if not usable:
        return None
    peak = max(r["throughput_rps"] for r in usable)
    return min((r for r in usable if r["throughput_rps"] >= fraction * peak), key=lambda r: r["concurrency"])


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def package_version(name: str) -> str | None:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(memory_gib() or 0, 1) or None,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "packages": {
            name: package_version(name)
            for name in ("tensorwire", "grpcio", "protobuf", "numpy", "onnxruntime", "locust")
        },
        "load_average": list(load) if load else None,
    }


def machine_markdown(info: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    mem = f", {info['memory_gib']:.0f} GiB RAM" if info.get("memory_gib") else ""
    return f"{info['cpu']}, {info['cores']} usable cores{mem}; {info['os']}; Python {info['python']}; {packages}"
