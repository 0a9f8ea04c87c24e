"""``tensorwire quantize``: INT8 ONNX with ONNX Runtime, and FP32 vs INT8 accuracy on held-out data.

* static (default): QDQ format, per-channel int8 weights, uint8 activations whose
  ranges are calibrated on real training samples. The fast path for CNNs.
* reduce_range (default on): weights use 7 of their 8 bits. ONNX Runtime's u8 x s8
  kernels on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI, SSE) multiply with
  VPMADDUBSW, which adds two products in a saturating 16-bit sum: 255 * 127 * 2 =
  64770 overflows it, 255 * 63 * 2 = 32130 cannot. With 7-bit weights the integer
  result is the same on every CPU, so accuracy measured here holds where the model is
  served (ONNX Runtime's quantize_static docstring recommends it for non-VNNI CPUs).
  Measured on the default digits CNN: without it, INT8 test accuracy 0.9777 on a VNNI
  CPU became 0.9703 on AVX2 kernels (same model file); with it, 0.9814 on both.
* dynamic: int8 weights, activations quantized on the fly; only MatMul/Gemm are
  quantized (Linear-heavy models). Convolutions are never dynamically quantized:
  ConvInteger is several times *slower* than FP32 on CPU.

The report (``export/quantize_report.json``) feeds ``publish``, which refuses an
INT8 model whose accuracy dropped more than the threshold unless forced.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.install_hint import install_hint
from tensorwire.trainer.artifacts import INPUT_NAME, accuracy, onnx_session, predict_onnx, splits_of
from tensorwire.trainer.config import QuantizeOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint, write_json

DYNAMIC_OPS = ["MatMul", "Gemm"]


class _Calibration:
    """Feeds calibration batches to ONNX Runtime's calibrator (its CalibrationDataReader protocol)."""

    def __init__(self, samples: np.ndarray, batch: int = 32) -> None:
        self._batches = iter([samples[i : i + batch] for i in range(0, len(samples), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:  # pragma: no cover - not used by MinMax calibration
        raise NotImplementedError


@contextlib.contextmanager
def quiet_logging():
    """onnxruntime.quantization logs advice at WARNING level for every model; keep errors only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _calibration_samples(train_x: np.ndarray, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    take = min(count, len(train_x))
    return train_x[rng.choice(len(train_x), size=take, replace=False)]


def _has_conv(path: Path) -> bool:
    import onnx

    return any(node.op_type == "Conv" for node in onnx.load(str(path), load_external_data=False).graph.node)


def quantize_static(fp32: Path, out: Path, samples: np.ndarray, per_channel: bool, reduce_range: bool = True) -> None:
    """Static QDQ INT8: uint8 activations calibrated (MinMax) on ``samples``, int8 weights (7-bit with
    ``reduce_range``), per-channel when asked."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(f".{out.stem}.prepared.onnx")
    try:
        with quiet_logging():
            try:  # shape inference + graph optimizations (folds BatchNorm into Conv): better INT8 models
                quant_pre_process(str(fp32), str(prepared))
                source = prepared
            except Exception:  # noqa: BLE001 - optional step; quantize the export as is
                source = fp32
            quantize_static(
                str(source),
                str(out),
                _Calibration(samples),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        prepared.unlink(missing_ok=True)


def quantize_dynamic(fp32: Path, out: Path, per_channel: bool, reduce_range: bool = True) -> None:
    """Dynamic INT8 of MatMul/Gemm weights (7-bit with ``reduce_range``); activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet_logging():
        quantize_dynamic(
            str(fp32),
            str(out),
            op_types_to_quantize=DYNAMIC_OPS,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
        )


def quantize(opts: QuantizeOptions) -> dict[str, Any]:
    """Write ``export/model.int8.onnx`` and the accuracy report; returns the report."""
    try:
        import onnx  # noqa: F401 - onnxruntime.quantization needs it but does not declare it
    except ImportError:
        raise TrainerError(f"quantization needs the 'onnx' package ({install_hint('train')})") from None
    if opts.calibration_samples < 1:
        raise TrainerError("--calibration-samples must be at least 1")
    run = RunFolder.at(opts.run)
    if not run.onnx.is_file():
        raise TrainerError(f"{run.onnx}: missing (run 'tensorwire export --run {run.root}' first)")
    state = load_checkpoint(run.best)
    splits = splits_of(state)
    mode = "static" if opts.mode == "auto" else opts.mode
    if mode == "static":
        samples = _calibration_samples(splits.train.x, opts.calibration_samples, state["config"]["seed"])
        quantize_static(run.onnx, run.int8, samples, opts.per_channel, opts.reduce_range)
    else:
        quantize_dynamic(run.onnx, run.int8, opts.per_channel, opts.reduce_range)
    fp32_logits = predict_onnx(onnx_session(run.onnx), splits.test.x)
    int8_logits = predict_onnx(onnx_session(run.int8), splits.test.x)
    fp32_acc, int8_acc = accuracy(fp32_logits, splits.test.y), accuracy(int8_logits, splits.test.y)
    drop = round((fp32_acc - int8_acc) * 100, 4)
    report = {
        "mode": mode,
        "per_channel": opts.per_channel,
        "reduce_range": opts.reduce_range,
        "calibration_samples": opts.calibration_samples if mode == "static" else 0,
        "quantized_ops": "all (QDQ)" if mode == "static" else ",".join(DYNAMIC_OPS),
        "convolutions_left_fp32": mode == "dynamic" and _has_conv(run.onnx),
        "test_samples": len(splits.test),
        "fp32_accuracy": fp32_acc,
        "int8_accuracy": int8_acc,
        "accuracy_drop_points": drop,
        "top1_agreement": float((fp32_logits.argmax(1) == int8_logits.argmax(1)).mean()),
        "max_accuracy_drop": opts.max_accuracy_drop,
        "within_threshold": drop <= opts.max_accuracy_drop,
        "fp32_bytes": run.onnx.stat().st_size,
        "int8_bytes": run.int8.stat().st_size,
        "file": str(run.int8),
    }
    write_json(run.quantize_report, report)
    return report
