"""The in-process ceiling: how fast ONNX Runtime alone runs a model, with no server in the way.

    python -m tensorwire.loadtest.ceiling --model bench_models/cnn/1/model.onnx \
        --batch-sizes 1,2,4,8,16,32,64 --threads 1,2 [--replicas 1,2] [--seconds 1] [--json out.json]

For every (intra-op threads, replicas, batch size) it warms up, then calls ``session.run`` in a closed
loop for a fixed time window, ``repeats`` times; it reports the median window's throughput
(samples/s and batches/s) and the latency percentiles of all calls. ``replicas = R`` runs R sessions
side by side, each in its own Python thread (ONNX Runtime releases the GIL), the way a server's
replica pool would: compare ``threads=2, replicas=1`` with ``threads=1, replicas=2`` to choose an
``instance_group`` for a 2-core machine.

Inputs are seeded standard-normal samples (finite: the CNN stays finite), shaped from the model's
own input metadata with the first dimension as the batch. ``tensorwire bench --ceiling`` and the
benchmark scenarios use :func:`measure_model_ceiling` (the same, placed as the server places the model)
and :func:`attach_efficiency` (served ÷ ceiling per level).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.loadtest import _stats
from tensorwire.loadtest._cli import DefaultsOnceFormatter, positive_ints
from tensorwire.loadtest._inputs import make_arrays, session_specs


def make_session(model_path: str | Path, threads: int, spinning: bool = True):
    """A CPU session with ``threads`` intra-op threads and sequential execution; ``spinning=False`` stops
    idle intra-op threads from spinning (ONNX Runtime's default is to spin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def make_inputs(session, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs for every model input (as every load generator here builds them); the first dimension
    is the batch, other symbolic dims 1. Raises ValueError for a string input."""
    specs = session_specs(session, batch)
    text = [spec.name for spec in specs if spec.datatype == "BYTES"]
    if text:
        raise ValueError(f"input {text[0]!r} holds strings; only numeric inputs are supported")
    return make_arrays(specs, seed)


def _run_window(sessions, feeds, seconds: float) -> tuple[int, float, list[float]]:
    """Every session runs in its own thread until ``seconds`` pass; (calls, elapsed s, latencies s)."""
    latencies: list[list[float]] = [[] for _ in sessions]
    barrier = threading.Barrier(len(sessions) + 1)
    stop_at = [0.0]

    def worker(i: int) -> None:
        session, mine = sessions[i], latencies[i]
        barrier.wait()
        now = time.perf_counter()
        while now < stop_at[0]:
            session.run(None, feeds)
            end = time.perf_counter()
            mine.append(end - now)
            now = end

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(sessions))]
    for t in threads:
        t.start()
    started = time.perf_counter()
    stop_at[0] = started + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


def measure_ceiling(
    model_path: str | Path,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    threads: Sequence[int] = (1, 2),
    seconds: float = 1.0,
    replicas: Sequence[int] = (1,),
    repeats: int = 3,
    warmup_s: float = 0.2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Throughput and latency of ONNX Runtime alone, per (threads, replicas, batch size).

    Each row: model, threads, replicas, batch_size, samples_per_s, batches_per_s (medians over
    ``repeats`` windows of ``seconds``), latency_ms_p50 / _p90 / _p99 (over all calls of all windows),
    calls, cores_used (this process's CPU seconds per wall second: below threads x replicas means
    other processes took CPU, or threads waited), load_1m (the machine's load average before the
    point), repeats, seconds.
    """
    rows = []
    path = Path(model_path)
    name = path.parent.parent.name if path.parent.name.isdigit() else path.stem  # <repo>/<name>/<v>/
    for n_threads in threads:
        for n_replicas in replicas:
            sessions = [make_session(model_path, n_threads) for _ in range(n_replicas)]
            for batch in batch_sizes:
                feeds = make_inputs(sessions[0], batch, seed)
                for session in sessions:  # first call pays shape-specific set-up
                    session.run(None, feeds)
                _run_window(sessions, feeds, warmup_s)
                throughputs, all_latencies, calls, wall = [], [], 0, 0.0
                cpu_before, load_before = _stats.own_cpu_s(), _stats.load_average()
                for _ in range(repeats):
                    n, elapsed, latencies = _run_window(sessions, feeds, seconds)
                    throughputs.append(n / elapsed)
                    all_latencies += latencies
                    calls += n
                    wall += elapsed
                cores_used = (_stats.own_cpu_s() - cpu_before) / wall
                batches_per_s = statistics.median(throughputs)
                p50, p90, p99 = np.percentile(np.asarray(all_latencies) * 1e3, [50, 90, 99])
                rows.append(
                    {
                        "model": name,
                        "threads": n_threads,
                        "replicas": n_replicas,
                        "batch_size": batch,
                        "samples_per_s": batches_per_s * batch,
                        "batches_per_s": batches_per_s,
                        "latency_ms_p50": float(p50),
                        "latency_ms_p90": float(p90),
                        "latency_ms_p99": float(p99),
                        "calls": calls,
                        "cores_used": cores_used,
                        "load_1m": load_before,
                        "repeats": repeats,
                        "seconds": seconds,
                    }
                )
            del sessions
    return rows


# --------------------------------------------------------------------------- a served model's ceiling


def latest_model_file(repo: Path, model: str, version: str | None = None) -> tuple[Path, Any]:
    """(model file, validated config) of ``model`` in a local repository: ``version`` or the newest served one.

    Raises FileNotFoundError when the model has no version folder, RepositoryConfigError for a bad config.
    """
    from tensorwire.repository import available_versions, load_model_config

    model_dir = Path(repo) / model
    config = load_model_config(model_dir)
    versions = available_versions(model_dir)
    if not versions:
        raise FileNotFoundError(f"{model_dir} has no version folders")
    chosen = int(version) if version else max(config.version_policy.select(versions) or versions)
    return model_dir / str(chosen) / config.model_filename, config


def ceiling_placement(config: Any | None, cores: int) -> tuple[int, int]:
    """(intra-op threads, replicas) the server gives a CPU model: the config's replicas, and its threads or
    ``cores // replicas`` (the server's rule: threads x replicas <= cores); ``(cores, 1)`` without a config."""
    if config is None:
        return cores, 1
    groups = config.instance_group
    replicas = sum(g.count for g in groups)
    threads = groups[0].threads or max(1, cores // replicas)
    return threads, replicas


def ceiling_batch_sizes(rows: int, max_batch_size: int, batching: bool, concurrency: Sequence[int]) -> list[int]:
    """The batch sizes a server could form: powers of two from ``rows`` (rows per request) up to
    min(max_batch_size, rows x the highest concurrency), that bound included; ``[rows]`` without batching."""
    if not batching or max_batch_size <= 0:
        return [rows]
    top = min(max_batch_size, rows * max(concurrency))
    sizes = {rows}
    size = rows
    while size * 2 <= top:
        size *= 2
        sizes.add(size)
    sizes.add(top)
    return sorted(sizes)


def attach_efficiency(
    levels: list[dict[str, Any]], ceiling: list[dict[str, Any]], max_batch_size: int, batching: bool
) -> None:
    """Fill ``ceiling_batch``, ``ceiling_samples_per_s`` and ``efficiency`` (served ÷ ceiling) in every level.

    A level's ceiling is the best measured batch size it could form: at most concurrency x its rows
    (and max_batch_size) with batching, its own rows without.
    """
    if not ceiling:
        return
    for level in levels:
        limit = level["batch_size"]
        if batching and max_batch_size > 0:
            limit = min(max_batch_size, level["concurrency"] * level["batch_size"])
        fits = [c for c in ceiling if c["batch_size"] <= limit] or [min(ceiling, key=lambda c: c["batch_size"])]
        best = max(fits, key=lambda c: c["samples_per_s"])
        level["ceiling_batch"] = best["batch_size"]
        level["ceiling_samples_per_s"] = best["samples_per_s"]
        served = level["throughput_samples_per_s"]
        level["efficiency"] = served / best["samples_per_s"] if best["samples_per_s"] else None


def measure_model_ceiling(
    model_file: Path,
    config: Any | None,
    sizes: Sequence[int],
    seconds: float,
    repeats: int,
    threads: int | None = None,
    replicas: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """:func:`measure_ceiling` of one ONNX file placed as the server would place it (or as told);
    returns (rows, the settings used)."""
    from tensorwire.loadtest.report import usable_cores

    placed_threads, placed_replicas = ceiling_placement(config, usable_cores())
    threads = threads or placed_threads
    replicas = replicas or placed_replicas
    rows = measure_ceiling(model_file, sizes, [threads], seconds=seconds, replicas=[replicas], repeats=repeats)
    return rows, {
        "model_file": str(model_file),
        "threads": threads,
        "replicas": replicas,
        "seconds": seconds,
        "repeats": repeats,
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| model | threads | replicas | batch | samples/s | batches/s | p50 ms | p99 ms | cores used |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['replicas']} | {r['batch_size']} "
            f"| {r['samples_per_s']:,.0f} "
            f"| {r['batches_per_s']:,.1f} | {r['latency_ms_p50']:.3f} | {r['latency_ms_p99']:.3f} "
            f"| {r['cores_used']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.ceiling",
        description="In-process ONNX Runtime throughput and latency: the ceiling a server can approach.",
        formatter_class=DefaultsOnceFormatter,
    )
    parser.add_argument(
        "--model", type=Path, required=True, action="append", help="path to a model.onnx (repeat for several models)"
    )
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=positive_ints, default=[1, 2], help="intra-op thread counts to try")
    parser.add_argument("--replicas", type=positive_ints, default=[1], help="concurrent sessions to try (default 1)")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one measurement window")
    parser.add_argument("--repeats", type=int, default=3, help="windows per point; the median is reported")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="FILE",
        help="also write the rows as JSON to FILE (or stdout with no FILE)",
    )
    args = parser.parse_args(argv)

    busy = _stats.load_average()
    if busy is not None and busy > (os.cpu_count() or 1) * 0.5:
        print(
            f"warning: load average {busy:.1f} on {os.cpu_count()} cores before measuring: other processes "
            "compete for the CPU and the numbers will be low and noisy",
            file=sys.stderr,
        )
    rows = []
    for model in args.model:
        if not model.exists():
            parser.error(f"no such model file: {model}")
        rows += measure_ceiling(model, args.batch_sizes, args.threads, args.seconds, args.replicas, args.repeats)
    if args.json == "-":
        print(json.dumps(rows, indent=2))
    else:
        print(markdown_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
