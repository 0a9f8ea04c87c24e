"""Variable-length requests: the Transformer classifier with padding on and off (a scenario's measure/render pair).

The model is the trainer's token-sequence Transformer (``tensorwire fit --data jokes --model transformer``,
a small recipe: d_model 64, 2 layers, 3 epochs on one process), exported to ONNX (dynamic batch and sequence
dimensions) and published with ``tensorwire publish``, which declares INPUT0's 0-padding; it is built once
into the benchmark store (``.cache/benchmarks/models``) and reused. The repository serves the same file
twice: ``jokes_padded`` (the published config: requests of different lengths share a batch within
``max_padded_share``) and ``jokes_unpadded`` (no ``padding``: only requests of equal length share one).

The load: a closed loop of ``concurrency`` asyncio clients (tensorwire's SDK, one channel), each sending one
sequence at a time whose length is drawn uniformly from [MIN_LENGTH, MAX_LENGTH] and whose token ids are
drawn uniformly from the vocabulary (seeded; the model's speed depends on the length, not the words).
Reported per model: requests/s, p50/p99 latency, the average batch (ModelStatistics: inference_count /
execution_count) and the padded share of the padded input's elements (``tensorwire_padding_elements`` /
``tensorwire_padded_input_elements`` from the metrics port).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.loadtest import report
from tensorwire.loadtest._stats import ServerCounters, percentiles_ms, server_delta
from tensorwire.loadtest.harness import Context, Page
from tensorwire.loadtest.launch import serve

MODEL = "jokes_transformer"  # in the store
TOKENIZER = "tokenizer.json"  # the run's tokenizer, kept beside the model in the store
PADDED, UNPADDED = "jokes_padded", "jokes_unpadded"
MIN_LENGTH, MAX_LENGTH = 8, 128
CONCURRENCY = 64
#: (warm-up s, measured s): full, quick
TIMING = ((5.0, 30.0), (1.0, 3.0))
#: the small recipe the model is trained with (seconds on 2 cores)
RECIPE = (
    "--data",
    "jokes",
    "--model",
    "transformer",
    "--max-length",
    "128",
    "--model-arg",
    "d_model=64",
    "--model-arg",
    "ff=128",
    "--model-arg",
    "layers=2",
    "--epochs",
    "3",
    "--nproc-per-node",
    "1",
    "--no-progress",
)


def build_model(ctx: Context) -> Path:
    """The published Transformer in the store (trained, exported and published on first use); its folder."""
    target = ctx.store / MODEL
    if (target / "config.toml").is_file():
        return target
    work = ctx.workdir / "jokes_transformer_build"
    shutil.rmtree(work, ignore_errors=True)
    run, repo = work / "run", work / "repo"
    log_path = ctx.out_dir() / "build.log"
    ctx.log(f"training the Transformer on jokes (tensorwire fit, small recipe); log: {log_path}")
    cli = [sys.executable, "-m", "tensorwire.cli"]
    with open(log_path, "wb") as out:
        for args in (
            ["fit", *RECIPE, "--run", str(run)],
            ["export", "--run", str(run), "--formats", "onnx"],
            ["publish", "--run", str(run), "--repo", str(repo), "--name", MODEL, "--format", "onnx"],
        ):
            done = subprocess.run([*cli, *args], stdout=out, stderr=subprocess.STDOUT)
            if done.returncode:
                raise RuntimeError(f"tensorwire {args[0]} failed (exit {done.returncode}); see {log_path}")
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(repo / MODEL, target)
    shutil.copy(run / "export" / "tokenizer.json", target / TOKENIZER)  # its vocabulary bounds the token ids
    return target


def make_repo(ctx: Context, source: Path) -> Path:
    """A repository with the model twice: as published (padding on) and without ``padding`` (off)."""
    from tensorwire.repository import load_model_config, write_model_config

    repo = ctx.workdir / "repos" / "variable_length"
    shutil.rmtree(repo, ignore_errors=True)
    config = load_model_config(source)
    if not any(spec.padding is not None for spec in config.inputs or []):
        raise RuntimeError(f"{source}/config.toml declares no padding; rebuild it (delete {source})")
    unpadded = config.model_copy(
        update={
            key: [spec.model_copy(update={"padding": None}) for spec in getattr(config, key) or []] or None
            for key in ("inputs", "outputs")
        }
    )
    for name, variant in ((PADDED, config), (UNPADDED, unpadded)):
        shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("config.toml", TOKENIZER))
        write_model_config(variant, repo / name)
    return repo


def _vocabulary(source: Path) -> int:
    """The number of token ids the model knows (its tokenizer's vocabulary)."""
    tokenizer = json.loads((source / TOKENIZER).read_text(encoding="utf-8"))
    return len(tokenizer["model"]["vocab"])


async def _closed_loop(
    address: str, model: str, vocab: int, concurrency: int, warmup_s: float, window_s: float, seed: int
) -> dict[str, Any]:
    from tensorwire.client import AsyncInferenceClient

    rng = np.random.default_rng(seed)
    pool = [
        rng.integers(1, vocab, size=(1, int(length)), dtype=np.int64)
        for length in rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=4096)
    ]
    latencies: list[float] = []
    errors = 0
    async with AsyncInferenceClient(address) as client:
        await client.infer(model, {"INPUT0": pool[0]})  # metadata cached, channel up
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + window_s

        async def user(index: int) -> None:
            nonlocal errors
            i = index
            while True:
                now = time.perf_counter()
                if now >= stop_at:
                    return
                try:
                    await client.infer(model, {"INPUT0": pool[i % len(pool)]})
                except Exception:  # noqa: BLE001 - counted, the loop goes on
                    errors += 1
                done = time.perf_counter()
                if now >= measure_from:
                    latencies.append(done - now)
                i += concurrency

        await asyncio.gather(*(user(i) for i in range(concurrency)))
    return {
        "requests": len(latencies),
        "errors": errors,
        "throughput_rps": len(latencies) / window_s,
        **percentiles_ms(latencies),
    }


def _padding_counters(metrics_port: int, model: str) -> tuple[float, float]:
    """(padding elements, padded input elements) of ``model`` from the metrics port (0, 0 when absent)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {"tensorwire_padding_elements": 0.0, "tensorwire_padded_input_elements": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name in found:
            found[family.name] = sum(
                s.value for s in family.samples if s.labels.get("model") == model and s.name.endswith("_total")
            )
    return found["tensorwire_padding_elements"], found["tensorwire_padded_input_elements"]


def in_process_cost(model_file: Path, vocab: int, lengths: tuple[int, ...] = (16, 64, 128)) -> list[dict[str, Any]]:
    """ONNX Runtime alone (one intra-op thread, fastest of 15 runs): ms per sequence at batch 1 and 8 for each
    length, so that the served numbers can be read against what batching buys this model at all."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(1)
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for batch in (1, 8):
            x = rng.integers(1, vocab, size=(batch, length), dtype=np.int64)
            session.run(None, {name: x})
            times = []
            for _ in range(15):
                started = time.perf_counter()
                session.run(None, {name: x})
                times.append(time.perf_counter() - started)
            row[f"batch{batch}_ms_per_sequence"] = min(times) / batch * 1e3
        rows.append(row)
    return rows


def measure(ctx: Context) -> dict[str, Any]:
    """Both models on one server, one after the other, at CONCURRENCY (quick: 16 and a few seconds)."""
    from tensorwire.client import InferenceClient

    source = build_model(ctx)
    repo = make_repo(ctx, source)
    vocab = _vocabulary(source)
    warmup_s, window_s = ctx.pick(*TIMING)
    concurrency = ctx.pick(CONCURRENCY, 16)
    rows = []
    ctx.log(f"starting tensorwire for {PADDED}, {UNPADDED}")
    with serve(repo, models=(PADDED, UNPADDED), ready_timeout=300, log_dir=ctx.out_dir()) as server:
        for model in (PADDED, UNPADDED):
            with InferenceClient(server.address) as client:
                before = ServerCounters.from_response(client.model_statistics(model), model)
                padding_before = _padding_counters(server.metrics_port, model)
                loop = asyncio.run(_closed_loop(server.address, model, vocab, concurrency, warmup_s, window_s, 0))
                after = ServerCounters.from_response(client.model_statistics(model), model)
                padding_after = _padding_counters(server.metrics_port, model)
            padding = padding_after[0] - padding_before[0]
            elements = padding_after[1] - padding_before[1]
            row = {
                "model": model,
                "padding": "on" if model == PADDED else "off",
                "concurrency": concurrency,
                **loop,
                **server_delta(before, after),
                "padded_share": padding / elements if elements else None,
            }
            ctx.log(
                f"  {model} c={concurrency}: {row['throughput_rps']:,.0f} req/s, p99 {row['latency_p99_ms']:.1f} ms, "
                f"avg batch {report.fmt(row['server_avg_batch'], '{:.2f}')}, padded share "
                f"{report.fmt(row['padded_share'], '{:.1%}')}"
            )
            rows.append(row)
    cost = in_process_cost(next(source.glob("*/model.onnx")), vocab)
    return {
        "rows": rows,
        "in_process": cost,
        "lengths": [MIN_LENGTH, MAX_LENGTH],
        "recipe": " ".join(RECIPE),
        "window_s": window_s,
    }


COLUMNS = [
    ("padding", "padding", "{}"),
    ("concurrency", "concurrency", "{}"),
    ("throughput_rps", "requests/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.1f}"),
    ("latency_p99_ms", "p99 ms", "{:.1f}"),
    ("server_avg_batch", "average batch", "{:.2f}"),
    ("padded_share", "padded share", "{:.1%}"),
    ("errors", "errors", "{}"),
]


COST_COLUMNS = [
    ("length", "tokens", "{}"),
    ("batch1_ms_per_sequence", "batch 1", "{:.3f}"),
    ("batch8_ms_per_sequence", "batch 8 (equal lengths)", "{:.3f}"),
]


def render(result: dict[str, Any], page: Page) -> str:
    """The table: padding on against off, and the speed-up."""
    rows = result["rows"]
    low, high = result["lengths"]
    lines = [
        f"The trainer's token-sequence Transformer (`tensorwire fit {result['recipe']}`, exported to ONNX and "
        f"published), served twice from one server: with the published `padding` on INPUT0 (requests of "
        f"different lengths share a batch, at most `max_padded_share` = 25 % of its elements padding) and "
        f"without it (only equal lengths share a batch). A closed loop of asyncio clients sends one sequence "
        f"per request, its length uniform in {low}–{high} tokens, for {result['window_s']:g} s after a warm-up.",
        "",
        report.markdown_table(rows, COLUMNS),
    ]
    on = next((r for r in rows if r["padding"] == "on"), None)
    off = next((r for r in rows if r["padding"] == "off"), None)
    if on and off and off.get("throughput_rps"):
        lines += ["", f"Padding on: {on['throughput_rps'] / off['throughput_rps']:.2f}× the throughput of padding off."]
    if result.get("in_process"):
        lines += [
            "",
            "What batching buys this model at all: ONNX Runtime alone, one thread, ms per sequence (fastest of 15):",
            "",
            report.markdown_table(result["in_process"], COST_COLUMNS),
        ]
    return "\n".join(lines)
