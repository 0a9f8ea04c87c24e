"""INT8 vs FP32 and DDP scaling, printed as markdown: ``python -m tensorwire.trainer.bench_int8``.

1. In-process ONNX Runtime throughput of the ResNet-style CNN on 3x32x32 inputs
   (synthetic data: speed does not depend on what the weights learned): FP32,
   static INT8 (QDQ, per-channel, what ``quantize`` ships), dynamic INT8 on
   MatMul/Gemm only (what ``quantize --mode dynamic`` ships) and, to show why we
   never do it, dynamic INT8 including convolutions (ConvInteger).
2. Accuracy FP32 vs static INT8 of the digits CNN on the held-out test split.
3. Wall time of the same ``fit`` (same data, epochs, global batch) with 1 and 2 processes,
   on tiny digits (communication-bound) and on a 3x32x32 CNN (compute-bound).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _throughput(sessions: dict, batch: int, seconds: float, rounds: int = 3) -> dict[str, float]:
    """Samples per second of each ORT session running back-to-back batches: measured in
    interleaved rounds, best round kept, so a burst of load elsewhere skews no single model."""
    x = np.random.default_rng(0).normal(size=(batch, 3, 32, 32)).astype(np.float32)
    best = dict.fromkeys(sessions, 0.0)
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {session.get_inputs()[0].name: x})
    for _ in range(rounds):
        for key, session in sessions.items():
            name = session.get_inputs()[0].name
            runs, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds / rounds:
                session.run(None, {name: x})
                runs += 1
            best[key] = max(best[key], runs * batch / elapsed)
    return best


def cnn_models(folder: Path, width: int) -> dict[str, Path]:
    """FP32 and three INT8 variants of a ResNet-style CNN for 3x32x32."""
    import torch
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_dynamic

    from tensorwire.trainer.data import DataSpec, _synthetic
    from tensorwire.trainer.export import export_onnx
    from tensorwire.trainer.models import build_model
    from tensorwire.trainer.quantize import quantize_dynamic, quantize_static, quiet_logging

    torch.manual_seed(0)
    model = build_model("cnn", (3, 32, 32), 10, {"width": width}).eval()
    x, _ = _synthetic(DataSpec(data="synthetic", input_shape=(3, 32, 32), num_samples=256))
    with torch.no_grad():  # give batch norm realistic running statistics
        model.train()
        for i in range(0, 256, 64):
            model(torch.from_numpy(x[i : i + 64]))
        model.eval()
    paths = {
        "fp32": folder / "fp32.onnx",
        "static": folder / "static.onnx",
        "dynamic": folder / "dynamic.onnx",
        "dynamic_conv": folder / "dynamic_conv.onnx",
    }
    export_onnx(model, (3, 32, 32), paths["fp32"])
    quantize_static(paths["fp32"], paths["static"], x[:128], per_channel=True)
    quantize_dynamic(paths["fp32"], paths["dynamic"], per_channel=True)
    with quiet_logging():
        ort_dynamic(
            str(paths["fp32"]),
            str(paths["dynamic_conv"]),
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    return paths


def bench_inference(width: int, threads: int, seconds: float) -> list[str]:
    labels = {
        "fp32": "FP32",
        "static": "static INT8 (QDQ, per-channel)",
        "dynamic": "dynamic INT8, MatMul/Gemm only",
        "dynamic_conv": "dynamic INT8 incl. Conv (never shipped)",
    }
    from tensorwire.trainer.artifacts import onnx_session

    with tempfile.TemporaryDirectory() as tmp:
        paths = cnn_models(Path(tmp), width)
        sessions = {key: onnx_session(path, threads=threads) for key, path in paths.items()}
        rates = {(k, b): r for b in (1, 32) for k, r in _throughput(sessions, b, seconds).items()}
    lines = [
        f"In-process ONNX Runtime, ResNet-style CNN (width {width}) on 3x32x32, "
        f"{threads} intra-op thread(s):",
        "",
        "| model | batch 1 (samples/s) | vs FP32 | batch 32 (samples/s) | vs FP32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in labels.items():
        one, many = rates[(key, 1)], rates[(key, 32)]
        lines.append(
            f"| {label} | {one:,.0f} | {one / rates[('fp32', 1)]:.2f}x | {many:,.0f} | "
            f"{many / rates[('fp32', 32)]:.2f}x |"
        )
    return lines


#: The same work for 1 and 2 processes: (label, fit arguments). Digits is tiny (communication
#: dominates); the 3x32x32 CNN is compute-bound, where a second process can pay off.
FIT_WORKLOADS = [
    ("digits CNN (width 16), 10 epochs", ["--data", "digits", "--model-arg", "width=16", "--epochs", "10"]),
    (
        "synthetic 3x32x32 CNN (width 32), 2,048 samples, 3 epochs",
        ["--data", "synthetic", "--input-shape", "3,32,32", "--num-samples", "2048", "--epochs", "3"],
    ),
]


def _timed_fit(run: Path, nproc: int, args: list[str]) -> tuple[float, dict]:
    """Wall time of the whole ``tensorwire fit`` command (start-up included), and its summary."""
    command = [
        sys.executable,
        "-m",
        "tensorwire.cli",
        "fit",
        "--model",
        "cnn",
        "--patience",
        "0",
        "--no-progress",
        "--nproc-per-node",
        str(nproc),
        "--run",
        str(run),
        *args,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"fit failed:\n{result.stdout}{result.stderr}")
    return wall, json.loads((run / "fit_summary.json").read_text())


def bench_fit(folder: Path) -> list[str]:
    lines = [
        "DDP `fit`, the same work (data, epochs, global batch 64) with 1 and 2 processes, one thread each:",
        "",
        "| workload | processes | wall time of `fit` (s) | training loop (s) | best val accuracy |",
        "|---|---:|---:|---:|---:|",
    ]
    for index, (label, args) in enumerate(FIT_WORKLOADS):
        for nproc in (1, 2):
            wall, summary = _timed_fit(folder / f"fit{index}-{nproc}", nproc, args)
            lines.append(
                f"| {label} | {nproc} | {wall:.1f} | {summary['seconds']:.1f} | "
                f"{summary['best_val_accuracy']:.4f} |"
            )
    return lines


def bench_accuracy(folder: Path) -> list[str]:
    """FP32 vs static INT8 on digits' held-out split, for the 2-process digits run of bench_fit."""
    from tensorwire.trainer.config import ExportOptions, QuantizeOptions
    from tensorwire.trainer.export import export
    from tensorwire.trainer.quantize import quantize

    run = folder / "fit0-2"
    if not (run / "best.pt").exists():
        _timed_fit(run, 2, FIT_WORKLOADS[0][1])
    export(ExportOptions(run=str(run), formats=["onnx"]))
    report = quantize(QuantizeOptions(run=str(run), mode="static"))
    return [
        f"Digits CNN on the held-out test split ({report['test_samples']} samples): FP32 "
        f"{report['fp32_accuracy']:.4f}, static INT8 {report['int8_accuracy']:.4f} (drop "
        f"{report['accuracy_drop_points']:.2f} points, top-1 agreement {report['top1_agreement']:.4f})."
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.trainer.bench_int8", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--width", type=int, default=32, help="CNN base width for the 3x32x32 model (default: 32)"
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default: 1)")
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="timed seconds per measurement (default: 3)"
    )
    parser.add_argument("--skip-fit", action="store_true", help="skip the 1 vs 2 process fit comparison")
    args = parser.parse_args(argv)
    lines = bench_inference(args.width, args.threads, args.seconds)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_fit:
            lines += [""] + bench_fit(Path(tmp))
        lines += [""] + bench_accuracy(Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
