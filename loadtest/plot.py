"""Throughput and p99 latency against concurrency, as a PNG (matplotlib, the ``loadtest`` extra).

One panel per model: throughput (samples/s, solid, left axis) and p99 latency (ms, dashed, right
axis) per mode or variant, and the in-process ceiling (dotted) where it was measured.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorwire.install_hint import install_hint


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise PlotUnavailable(f"plots need matplotlib: {install_hint('loadtest')}") from err
    return plt


def _series_key(row: dict[str, Any]) -> str:
    return row.get("series") or row.get("mode") or "run"


def plot_levels(rows: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Write the PNG; rows are bench levels (``model``, ``concurrency``, ``throughput_samples_per_s``,
    ``latency_p99_ms``, optional ``ceiling_samples_per_s`` and ``series``/``mode``)."""
    plt = _pyplot()
    rows = [r for r in rows if r.get("concurrency")]
    models = list(dict.fromkeys(r["model_group"] if r.get("model_group") else r["model"] for r in rows))
    if not models:
        raise ValueError("nothing to plot: no benchmark levels")
    cols = min(3, len(models))
    lines = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(5.2 * cols, 3.8 * lines), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, model in enumerate(models):
        ax = axes[index // cols][index % cols]
        ax2 = ax.twinx()
        mine = [r for r in rows if (r.get("model_group") or r["model"]) == model]
        series = list(dict.fromkeys(_series_key(r) for r in mine))
        served = max((r.get("throughput_samples_per_s") or 0 for r in mine), default=0)
        ceilings = [r["ceiling_samples_per_s"] for r in mine if r.get("ceiling_samples_per_s")]
        # A ceiling far above what was served (identity: millions/s) would flatten every other line.
        show_ceiling = bool(ceilings) and max(ceilings) <= 5 * served
        if ceilings and not show_ceiling:
            ax.text(
                0.98,
                0.02,
                f"ceiling off the chart (≥ {min(ceilings):,.0f}/s)",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                alpha=0.7,
            )
        for i, name in enumerate(series):
            pts = sorted((r for r in mine if _series_key(r) == name), key=lambda r: r["concurrency"])
            xs = [r["concurrency"] for r in pts]
            color = colors[i % len(colors)]
            ax.plot(
                xs, [r.get("throughput_samples_per_s") or 0 for r in pts], "o-", color=color, label=f"{name} throughput"
            )
            p99 = [(x, r["latency_p99_ms"]) for x, r in zip(xs, pts, strict=True) if r.get("latency_p99_ms")]
            if p99:
                ax2.plot(*zip(*p99, strict=True), "s--", color=color, alpha=0.7, label=f"{name} p99")
            ceiling = [
                (x, r["ceiling_samples_per_s"]) for x, r in zip(xs, pts, strict=True) if r.get("ceiling_samples_per_s")
            ]
            if ceiling and show_ceiling:
                ax.plot(*zip(*ceiling, strict=True), ":", color=color, alpha=0.6, label=f"{name} ceiling")
        ax.set_xscale("log", base=2)
        xs_all = sorted({r["concurrency"] for r in mine})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel("throughput (samples/s)")
        ax2.set_ylabel("p99 latency (ms)")
        ax.set_ylim(bottom=0)
        ax2.set_ylim(bottom=0)
        if not (title and len(models) == 1):
            ax.set_title(model)
        ax.grid(True, alpha=0.3)
        handles = ax.get_legend_handles_labels()
        handles2 = ax2.get_legend_handles_labels()
        ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], fontsize=7, loc="upper left")
    for index in range(len(models), lines * cols):
        axes[index // cols][index % cols].axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
