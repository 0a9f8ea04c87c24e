"""What each compression technique buys, as one markdown table: ``python -m tensorwire.trainer.bench_compression``.

For each family (the ResNet-style CNN and a wide MLP on digits, the sequence Transformer on
pyjokes' jokes) one run trains the FP32 parent with DDP, then derives every variant from it
with the trainer's own commands: static INT8 (``quantize``), structurally pruned (``prune``),
pruned + INT8, a distilled student (``distill``), the ``torch.export`` program (``.pt2``) and,
where a C++ compiler exists, the AOTInductor package. Every variant is measured the same way:

* parameters, file size, held-out test accuracy (the parent's test split);
* in-process samples/s with 1 and 2 intra-op threads at batch 1 and 64 (ONNX Runtime for the
  ONNX files, torch for .pt2 / AOTInductor), on real test samples, best of interleaved rounds;
* served samples/s and p99 latency at concurrency 1 and 64 (one sample per request) through a
  real ``tensorwire serve`` on loopback, with the SDK's asyncio client in a closed loop, plus
  the server's average batch, the model's time per sample and its share of the served time per
  sample at concurrency 64 (from ModelStatistics): where a served speed-up goes when the model is
  not the bottleneck (Amdahl: only the model's share can shrink).

``compression_section(...)`` returns the markdown (for the benchmark generator); ``--quick`` is a
smoke run with tiny models and short windows (under ~2 minutes for one family).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Family:
    """One model family: how to train the parent, prune it and distill a student."""

    key: str
    title: str
    fit: dict[str, Any]
    prune: dict[str, Any]
    student: dict[str, Any]


def families(quick: bool) -> dict[str, Family]:
    """The three families of the table; ``quick`` shrinks models and epochs to a smoke run."""
    epochs = 1 if quick else 12
    return {
        "cnn": Family(
            "cnn",
            "ResNet-style CNN, digits (8x8)",
            {"data": "digits", "model": "cnn", "model_args": {"width": 8 if quick else 32}, "epochs": epochs},
            {"keep": 0.3 if quick else 0.2, "steps": 1 if quick else 2, "finetune_epochs": 1 if quick else 4},
            {"model": "cnn", "model_args": {"width": 4 if quick else 8}, "epochs": epochs + (0 if quick else 4)},
        ),
        "mlp": Family(
            "mlp",
            "wide MLP, digits (64 features)",
            {
                "data": "digits",
                "model": "mlp",
                "model_args": {"hidden": [128, 128] if quick else [2048, 2048]},
                "epochs": epochs,
            },
            {"keep": 0.3 if quick else 0.1, "steps": 1 if quick else 2, "finetune_epochs": 1 if quick else 4},
            {"model": "mlp", "model_args": {"hidden": [32, 32] if quick else [256, 256]}, "epochs": epochs + 4},
        ),
        "transformer": Family(
            "transformer",
            "sequence Transformer, pyjokes language ID (BPE tokens)",
            {
                "data": "jokes",
                "model": "transformer",
                "max_length": 24 if quick else 64,
                "model_args": {"d_model": 32, "heads": 4, "layers": 1, "ff": 64}
                if quick
                else {"d_model": 128, "heads": 4, "layers": 2, "ff": 512},
                "epochs": 1 if quick else 20,
            },
            {"keep": 0.6, "steps": 1, "finetune_epochs": 1 if quick else 5},
            {
                "model": "transformer",
                "model_args": {"d_model": 16, "heads": 2, "layers": 1, "ff": 32}
                if quick
                else {"d_model": 64, "heads": 4, "layers": 1, "ff": 128},
                "epochs": 1 if quick else 20,
            },
        ),
    }


@dataclass
class Variant:
    """One row: an artifact file, how to run it in-process, and how to publish it."""

    label: str
    run: Path
    fmt: str  # publish format: onnx, int8, pt2, aoti
    file: Path
    params: int
    accuracy: float
    numbers: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def _quiet():
    """The steps print progress (DDP workers straight to file descriptor 1); the benchmark's stdout
    carries only the table, so both go to stderr meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _fit(run: Path, settings: dict[str, Any], nproc: int) -> None:
    from tensorwire.trainer.config import FitOptions
    from tensorwire.trainer.launch import fit

    opts = FitOptions(run=str(run), nproc_per_node=nproc, progress=False, patience=0, overwrite=True, **settings)
    with _quiet():
        fit(opts)


def _export_quantize(run: Path, formats: list[str], int8: bool) -> dict[str, Any]:
    from tensorwire.trainer.config import ExportOptions, QuantizeOptions
    from tensorwire.trainer.export import export
    from tensorwire.trainer.quantize import quantize

    report = export(ExportOptions(run=str(run), formats=formats, verify_batch_sizes=[1, 7]))
    if int8:
        report["int8"] = quantize(QuantizeOptions(run=str(run)))
    return report


def build_variants(family: Family, work: Path, quick: bool, nproc: int, aoti: bool) -> list[Variant]:
    """Train the parent and derive every variant; returns the rows in table order."""
    from tensorwire.trainer.artifacts import load_trained
    from tensorwire.trainer.config import DistillOptions, FitOptions, PruneOptions
    from tensorwire.trainer.distill import distill
    from tensorwire.trainer.prune import prune
    from tensorwire.trainer.runfolder import RunFolder
    from tensorwire.trainer.structure import count_parameters

    parent, pruned, student = (RunFolder.at(work / f"{family.key}-{n}") for n in ("parent", "pruned", "student"))
    _fit(parent.root, family.fit, nproc)
    formats = ["onnx", "pt2"] + (["aoti"] if aoti else [])
    with _quiet():
        parent_report = _export_quantize(parent.root, formats, int8=True)
    with _quiet():
        prune(
            PruneOptions(
                source=str(parent.root), run=str(pruned.root), nproc_per_node=nproc, progress=False, **family.prune
            )
        )
    with _quiet():
        pruned_report = _export_quantize(pruned.root, ["onnx"], int8=True)
    student_settings = {k: v for k, v in family.fit.items() if k not in ("model", "model_args", "epochs")}
    student_settings.update(family.student)
    fit_opts = FitOptions(run=str(student.root), nproc_per_node=nproc, progress=False, patience=0, overwrite=True)
    for key, value in student_settings.items():
        setattr(fit_opts, key, value)
    with _quiet():
        distill(fit_opts, set(student_settings), DistillOptions(teacher=str(parent.root)))
    with _quiet():
        student_report = _export_quantize(student.root, ["onnx"], int8=False)

    def params(run: RunFolder) -> int:
        return count_parameters(load_trained(run.best)[0])

    rows = [
        Variant("FP32 (ONNX)", parent.root, "onnx", parent.onnx, params(parent), parent_report["onnx"]["accuracy"]),
        Variant(
            "INT8 (static QDQ)",
            parent.root,
            "int8",
            parent.int8,
            params(parent),
            parent_report["int8"]["int8_accuracy"],
        ),
        Variant("pruned", pruned.root, "onnx", pruned.onnx, params(pruned), pruned_report["onnx"]["accuracy"]),
        Variant(
            "pruned + INT8", pruned.root, "int8", pruned.int8, params(pruned), pruned_report["int8"]["int8_accuracy"]
        ),
        Variant(
            "distilled student", student.root, "onnx", student.onnx, params(student), student_report["onnx"]["accuracy"]
        ),
        Variant(
            "torch.export (.pt2)", parent.root, "pt2", parent.pt2, params(parent), parent_report["pt2"]["accuracy"]
        ),
    ]
    if aoti:
        rows.append(
            Variant("AOTInductor", parent.root, "aoti", parent.aoti, params(parent), parent_report["aoti"]["accuracy"])
        )
    return rows


def _runner(variant: Variant, threads: int) -> Callable[[np.ndarray], Any]:
    """A function running one batch of the variant's file in this process."""
    if variant.fmt in ("onnx", "int8"):
        from tensorwire.trainer.artifacts import onnx_session

        session = onnx_session(variant.file, threads=threads)
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    import torch

    from tensorwire.trainer.export import load_aoti, load_pt2

    module = load_pt2(variant.file) if variant.fmt == "pt2" else load_aoti(variant.file)

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def _batch(test_x: np.ndarray, size: int) -> np.ndarray:
    reps = -(-size // len(test_x))
    return np.ascontiguousarray(np.concatenate([test_x] * reps)[:size])


def measure_in_process(variants: Sequence[Variant], test_x: np.ndarray, seconds: float, rounds: int = 3) -> None:
    """samples/s for threads {1, 2} x batch {1, 64}: interleaved rounds, best kept (noise only slows)."""
    import torch

    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)  # the torch variants' intra-op pool (process-wide)
            runners = {v.label: _runner(v, threads) for v in variants}
            for batch in (1, 64):
                x = _batch(test_x, batch)
                key = f"inproc_t{threads}_b{batch}"
                for variant in variants:
                    for _ in range(3):
                        runners[variant.label](x)
                    variant.numbers[key] = 0.0
                for _ in range(rounds):
                    for variant in variants:
                        run, count, start = runners[variant.label], 0, time.perf_counter()
                        while (elapsed := time.perf_counter() - start) < seconds / rounds:
                            run(x)
                            count += 1
                        variant.numbers[key] = max(variant.numbers[key], count * batch / elapsed)
    finally:
        torch.set_num_threads(saved)


async def _closed_loop(address: str, model: str, inputs: list[np.ndarray], concurrency: int, seconds: float):
    """``concurrency`` asyncio workers, each sending one request at a time; latencies of the timed window."""
    from tensorwire.client import AsyncInferenceClient

    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    warm_until = time.perf_counter() + min(1.0, seconds / 3)

    async def worker(index: int, client) -> None:
        i = index
        while (now := time.perf_counter()) < stop_at:
            await client.infer(model, {"INPUT0": inputs[i % len(inputs)]})
            if now >= warm_until:
                latencies.append(time.perf_counter() - now)
            i += concurrency

    async with AsyncInferenceClient(address) as client:
        await client.infer(model, {"INPUT0": inputs[0]})
        await asyncio.gather(*(worker(i, client) for i in range(concurrency)))
    return latencies, seconds - min(1.0, seconds / 3)


def _statistics(address: str, model: str) -> tuple[int, int, int]:
    """(inferences, executions, model time in ns). Model time sums the per-batch-size statistics:
    the per-request ``compute_infer`` counts a batch's time once for every request in it (Triton's rule)."""
    from tensorwire.client import InferenceClient

    with InferenceClient(address) as client:
        item = client.model_statistics(model).model_stats[0]
    return item.inference_count, item.execution_count, sum(b.compute_infer.ns for b in item.batch_stats)


def measure_served(variants: Sequence[Variant], family: str, test_x: np.ndarray, work: Path, seconds: float) -> None:
    """Publish every variant into one repository, serve it, and run the closed loops."""
    from tensorwire.loadtest.launch import serve
    from tensorwire.trainer.config import PublishOptions
    from tensorwire.trainer.publish import publish

    repo = work / f"{family}-models"
    names = {}
    for index, variant in enumerate(variants):
        names[variant.label] = f"{family}_{index}_{variant.fmt}"
        publish(
            PublishOptions(run=str(variant.run), repo=str(repo), force=True), fmt=variant.fmt, name=names[variant.label]
        )
    inputs = [test_x[i : i + 1] for i in range(min(len(test_x), 256))]
    with serve(repo, "--log-level", "WARNING") as server:
        address = server.address
        for variant in variants:
            name = names[variant.label]
            for concurrency in (1, 64):
                before = _statistics(address, name)
                latencies, window = asyncio.run(_closed_loop(address, name, inputs, concurrency, seconds))
                after = _statistics(address, name)
                variant.numbers[f"served_c{concurrency}"] = len(latencies) / window
                variant.numbers[f"p99_ms_c{concurrency}"] = float(np.percentile(latencies, 99) * 1000)
                inferences, executions, compute_ns = (a - b for a, b in zip(after, before, strict=True))
                variant.numbers[f"batch_c{concurrency}"] = inferences / max(executions, 1)
                # Model time per sample over served wall time per sample: the share of the serving cost
                # that a faster model (INT8, pruning) can remove at all.
                model_s = compute_ns / 1e9 / max(inferences, 1)
                variant.numbers[f"model_share_c{concurrency}"] = model_s * variant.numbers[f"served_c{concurrency}"]
                variant.numbers[f"model_ms_c{concurrency}"] = model_s * 1000


def _size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.0f} kB"


def family_table(title: str, variants: Sequence[Variant]) -> list[str]:
    base = variants[0].numbers
    lines = [
        f"**{title}**",
        "",
        "| variant | params | file | test acc | 1 thr b1 | 1 thr b64 | 2 thr b1 | 2 thr b64 | x FP32 (1 thr b64) "
        "| served c1 | p99 c1 (ms) | served c64 | p99 c64 (ms) | x FP32 (c64) | batch c64 | model ms/sample c64 "
        "| model share c64 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        n = v.numbers
        lines.append(
            f"| {v.label} | {v.params:,} | {_size(v.file)} | {v.accuracy:.4f} | {n['inproc_t1_b1']:,.0f} | "
            f"{n['inproc_t1_b64']:,.0f} | {n['inproc_t2_b1']:,.0f} | {n['inproc_t2_b64']:,.0f} | "
            f"{n['inproc_t1_b64'] / base['inproc_t1_b64']:.2f}x | {n['served_c1']:,.0f} | {n['p99_ms_c1']:.2f} | "
            f"{n['served_c64']:,.0f} | {n['p99_ms_c64']:.2f} | {n['served_c64'] / base['served_c64']:.2f}x | "
            f"{n['batch_c64']:.1f} | {n['model_ms_c64']:.3f} | {n['model_share_c64']:.0%} |"
        )
    return lines


def targets(results: dict[str, list[Variant]]) -> list[str]:
    """The three targets, each with the measured value (only for the CNN, when it ran)."""
    rows = results.get("cnn")
    if not rows:
        return []
    by = {v.label: v for v in rows}
    fp32 = by["FP32 (ONNX)"]

    def speedup(v: Variant) -> float:
        return v.numbers["inproc_t1_b64"] / fp32.numbers["inproc_t1_b64"]

    small = [v for v in rows if v.label in ("pruned", "distilled student") and fp32.accuracy - v.accuracy <= 0.01]
    best = max(small, key=speedup, default=None)
    combo = by["pruned + INT8"]
    int8 = by["INT8 (static QDQ)"]
    served = int8.numbers["served_c64"] / fp32.numbers["served_c64"]
    lines = [
        "Targets (CNN; in-process = 1 thread, batch 64):",
        "",
        (
            f"- pruned or distilled >= 2x FP32 within 1 accuracy point: {best.label} {speedup(best):.2f}x at "
            f"{(fp32.accuracy - best.accuracy) * 100:+.2f} points drop -> {'met' if speedup(best) >= 2 else 'missed'}"
            if best
            else "- pruned or distilled >= 2x FP32 within 1 accuracy point: no variant within 1 point -> missed"
        ),
        f"- pruned + INT8 >= 3x FP32: {speedup(combo):.2f}x -> {'met' if speedup(combo) >= 3 else 'missed'}",
        f"- served INT8 >= 1.3x FP32 at concurrency 64: {served:.2f}x -> {'met' if served >= 1.3 else 'missed'}. "
        f"Where the gain goes: at c64 the model takes {fp32.numbers['model_share_c64']:.0%} (FP32) and "
        f"{int8.numbers['model_share_c64']:.0%} (INT8) of the served time per sample, at an average batch of "
        f"{fp32.numbers['batch_c64']:.1f}; the rest (the RPC path, decoding, batching, on the same cores) "
        "is not shortened by INT8, so even an infinitely fast model would serve at most "
        f"{1 / max(1 - fp32.numbers['model_share_c64'], 1e-9):.2f}x FP32",
    ]
    return lines


def compression_section(
    quick: bool = False,
    family_keys: Sequence[str] = ("cnn", "mlp", "transformer"),
    seconds: float | None = None,
    served_s: float | None = None,
    nproc: int | None = None,
    aoti: bool | None = None,
    work: Path | None = None,
) -> str:
    """Train, compress, measure; returns the markdown section. Raises on any failed step."""
    from tensorwire.trainer.artifacts import splits_of
    from tensorwire.trainer.export import cxx_compiler
    from tensorwire.trainer.runfolder import load_checkpoint

    seconds = seconds if seconds is not None else (0.3 if quick else 3.0)
    served_s = served_s if served_s is not None else (1.0 if quick else 4.0)
    nproc = nproc or (1 if quick else 2)
    aoti = (not quick and cxx_compiler() is not None) if aoti is None else aoti
    table = families(quick)
    unknown = [k for k in family_keys if k not in table]
    if unknown:
        raise ValueError(f"unknown family {unknown[0]!r}; use {', '.join(table)}")
    results: dict[str, list[Variant]] = {}
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        root = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tensorwire-compress-")))
        for key in family_keys:
            family = table[key]
            variants = build_variants(family, root, quick, nproc, aoti)
            test_x = splits_of(load_checkpoint(variants[0].run / "best.pt")).test.x
            measure_in_process(variants, test_x, seconds)
            measure_served(variants, key, test_x, root, served_s)
            results[key] = variants
        # rendered inside the block: the tables read the variants' files, which the temporary folder holds
        lines = [
            "## Compression: what each technique buys",
            "",
            f"Generated by `python -m tensorwire.trainer.bench_compression{' --quick' if quick else ''}` in "
            f"{time.monotonic() - began:.0f} s ({os.cpu_count()} cores; training with {nproc} DDP process(es)). "
            "In-process: samples/s of the file alone (ONNX Runtime, or torch for .pt2/AOTInductor), real test "
            "samples, best of 3 interleaved rounds. Served: one sample per request through `tensorwire serve` "
            "(dynamic batching, one replica using every core), the SDK's asyncio client in a closed loop; "
            "average batch and model time per sample from ModelStatistics; model share = model time per sample / "
            "served wall time per sample.",
            "",
        ]
        for key, variants in results.items():
            lines += family_table(table[key].title, variants) + [""]
        lines += targets(results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.trainer.bench_compression",
        description="Train the CNN, wide MLP and Transformer, derive INT8, pruned, pruned + INT8, distilled, "
        ".pt2 and AOTInductor variants, and measure size, accuracy, in-process and served speed: one markdown "
        "section.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 epoch, short windows (a smoke run)")
    parser.add_argument(
        "--families", default="cnn,mlp,transformer", help="comma-separated: cnn, mlp, transformer (default: all)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="in-process seconds per cell (3; quick 0.3)")
    parser.add_argument("--served-seconds", type=float, default=None, help="served seconds per level (4; quick 1)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="DDP processes for training (2; quick 1)")
    parser.add_argument(
        "--aoti",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include AOTInductor (default: when "
        "a C++ compiler exists and not --quick; each package compiles for ~1 minute)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here (default: stdout)")
    parser.add_argument("--work", type=Path, default=None, help="keep runs and repositories here (default: a temp dir)")
    args = parser.parse_args(argv)
    section = compression_section(
        quick=args.quick,
        family_keys=[k.strip() for k in args.families.split(",") if k.strip()],
        seconds=args.seconds,
        served_s=args.served_seconds,
        nproc=args.nproc_per_node,
        aoti=args.aoti,
        work=args.work,
    )
    if args.out:
        args.out.write_text(section, encoding="utf-8")
    else:
        print(section, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
