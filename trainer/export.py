"""``tensorwire export``: TorchScript and ONNX files from the best checkpoint, each checked
against the eager model on random batches of several sizes.

ONNX uses the dynamo exporter with a dynamic batch dimension and one
self-contained file (weights inside); input and output are named INPUT0 and
OUTPUT0, the names written into the repository's config.toml. TorchScript is
traced under ``no_grad`` (tracing a Transformer encoder with autograd on fails)
and the trace is checked at batch sizes other than the one traced.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.trainer.artifacts import (
    INPUT_NAME,
    OUTPUT_NAME,
    accuracy,
    load_trained,
    onnx_session,
    predict_onnx,
    predict_torch,
    splits_of,
)
from tensorwire.trainer.config import ExportOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, write_json

FORMATS = ("onnx", "torchscript")


@contextlib.contextmanager
def _captured_stderr(log: Path, what: str):
    """torch.export prints whole graphs to stderr when it fails: keep them in a file, and name the
    file in our one-line error, instead of burying that line under pages of graph."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except TrainerError as err:
        if buffer.getvalue().strip():
            log.write_text(buffer.getvalue(), encoding="utf-8")
            raise TrainerError(f"{err} ({what} details: {log})") from err.__cause__
        raise


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs about optional torchvision ops, and whole graphs when it fails: the
    user gets our one-line error instead."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)  # torch configures its loggers' levels itself, so silence by severity
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def export_onnx(model, sample_shape: tuple[int, ...], path: Path) -> None:
    """One ONNX file with a dynamic batch dimension (example batch 2: batch 1 would be specialized)."""
    import torch
    from torch.export import Dim

    example = torch.zeros(2, *sample_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter(), _captured_stderr(path.with_name("onnx_export_error.log"), "exporter"):
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: Dim("batch", min=1)},),
            )
        except ModuleNotFoundError as err:
            raise TrainerError(f"ONNX export needs {err.name!r} (pip install 'tensorwire[train]')") from None
        except Exception as err:  # noqa: BLE001 - the exporter raises many types, with pages of detail
            raise TrainerError(f"ONNX export failed: {_first_line(err)}") from err
    if path.with_name(path.name + ".data").exists():
        raise TrainerError(f"{path}: the exporter wrote external weights; expected one self-contained file")


def export_torchscript(model, sample_shape: tuple[int, ...], path: Path) -> None:
    import torch

    example = torch.zeros(2, *sample_shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; our users still ask for it
        try:
            traced = torch.jit.trace(model, example)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways (e.g. data-dependent control flow)
            raise TrainerError(f"TorchScript tracing failed: {_first_line(err)}") from err
        torch.jit.save(traced, str(path))


def _first_line(err: BaseException) -> str:
    """The root cause's first line and, when torch names it, the user's line that raised it."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(root)).splitlines() if line.strip()]
    message = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    where = re.findall(r'File "([^"]+)", line (\d+)', str(err))
    return f"{message} (at {where[-1][0]}:{where[-1][1]})" if where else message


def _random_batches(sample_shape: tuple[int, ...], sizes: list[int], reference: np.ndarray, seed: int = 0):
    """Random inputs on the scale of the real data (a CNN fed huge values only checks overflow)."""
    rng = np.random.default_rng(seed)
    low, high = float(reference.min()), float(reference.max())
    for size in sizes:
        yield size, rng.uniform(low, high, size=(size, *sample_shape)).astype(np.float32)


def verify(
    run_model,
    eager,
    sample_shape: tuple[int, ...],
    sizes: list[int],
    reference: np.ndarray,
    tolerance: float,
    label: str,
) -> dict[str, float]:
    """Max abs difference of logits per batch size; raise if any exceeds ``tolerance``."""
    diffs: dict[str, float] = {}
    for size, x in _random_batches(sample_shape, sizes, reference):
        try:
            got = run_model(x)
        except Exception as err:  # noqa: BLE001 - any runtime failure means the export is unusable
            raise TrainerError(
                f"{label} fails on a batch of {size}: {str(err).strip().splitlines()[0]}"
            ) from None
        want = predict_torch(eager, x)
        if got.shape != want.shape:
            raise TrainerError(
                f"{label} returned shape {list(got.shape)} for a batch of {size}, expected {list(want.shape)}"
            )
        diffs[str(size)] = float(np.abs(got - want).max())
        if not diffs[str(size)] <= tolerance:
            raise TrainerError(
                f"{label} differs from the eager model by {diffs[str(size)]:.3g} at batch {size} "
                f"(--tolerance {tolerance:g})"
            )
    return diffs


def export(opts: ExportOptions) -> dict[str, Any]:
    """Write the requested formats into ``<run>/export`` and a report of their parity and accuracy."""
    import torch

    unknown = [f for f in opts.formats if f not in FORMATS]
    if unknown or not opts.formats:
        raise TrainerError(
            f"--formats: unknown format {unknown[0] if unknown else '(none)'!r}; use {', '.join(FORMATS)}"
        )
    if not opts.verify_batch_sizes or min(opts.verify_batch_sizes) < 1:
        raise TrainerError("--verify-batch-sizes must list positive batch sizes")
    run = RunFolder.at(opts.run)
    model, state = load_trained(Path(opts.checkpoint) if opts.checkpoint else run.best)
    spec = state["model_spec"]
    shape = tuple(spec["input_shape"])
    splits = splits_of(state)
    test = splits.test
    report: dict[str, Any] = {
        "checkpoint": str((Path(opts.checkpoint) if opts.checkpoint else run.best).resolve()),
        "epoch": state["epoch"],
        "model": spec["name"],
        "dataset": spec["dataset"],
        "input_shape": list(shape),
        "num_classes": spec["num_classes"],
        "test_samples": len(test),
        "eager_accuracy": accuracy(predict_torch(model, test.x), test.y),
        "tolerance": opts.tolerance,
    }
    if "onnx" in opts.formats:
        export_onnx(model, shape, run.onnx)
        session = onnx_session(run.onnx)
        diffs = verify(
            lambda x: predict_onnx(session, x),
            model,
            shape,
            opts.verify_batch_sizes,
            splits.train.x,
            opts.tolerance,
            "ONNX model",
        )
        report["onnx"] = {
            "file": str(run.onnx),
            "max_abs_diff": diffs,
            "accuracy": accuracy(predict_onnx(session, test.x), test.y),
        }
    if "torchscript" in opts.formats:
        export_torchscript(model, shape, run.torchscript)
        loaded = torch.jit.load(str(run.torchscript))
        diffs = verify(
            lambda x: predict_torch(loaded, x),
            model,
            shape,
            opts.verify_batch_sizes,
            splits.train.x,
            opts.tolerance,
            "TorchScript model",
        )
        report["torchscript"] = {
            "file": str(run.torchscript),
            "max_abs_diff": diffs,
            "accuracy": accuracy(predict_torch(loaded, test.x), test.y),
        }
    write_json(run.export_report, report)
    return report
