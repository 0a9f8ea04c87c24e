"""``tensorwire export``: ONNX, TorchScript, ``torch.export`` (.pt2) and AOTInductor files from the
best checkpoint, each checked against the eager model on random batches of several sizes.

ONNX uses the dynamo exporter with a dynamic batch dimension and one
self-contained file (weights inside); input and output are named INPUT0 and
OUTPUT0, the names written into the repository's config.toml. TorchScript is
traced under ``no_grad`` (tracing a Transformer encoder with autograd on fails)
and the trace is checked at batch sizes other than the one traced.

``pt2`` is a ``torch.export`` program (``torch.export.save``), the upstream successor of
TorchScript; ``aoti`` is the same program compiled ahead of time by AOTInductor into a package
of native code (``torch._inductor.aoti_compile_and_package``; needs a C++ compiler). Both have a
dynamic batch dimension. The example input has batch 2: ``torch.export`` specializes a
dimension whose example size is 0 or 1.

Token models (int64 ids, 0 = padding) are exported with a dynamic sequence dimension as well,
and verified at several sequence lengths with random padding: the legacy TorchScript-based ONNX
exporter would bake the traced length into Reshape nodes, the dynamo exporter with
``torch.export.Dim`` does not.
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

from tensorwire.install_hint import install_hint
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

FORMATS = ("onnx", "torchscript", "pt2", "aoti")

#: Sequence lengths that token models are verified at, besides their training length.
VERIFY_LENGTHS = (3, 17)


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


def dynamic_shapes(dtype: str) -> tuple[dict[int, Any], ...]:
    """``torch.export`` dynamic dimensions: the batch, and for token ids (int64) the sequence too."""
    from torch.export import Dim

    dims: dict[int, Any] = {0: Dim("batch", min=1)}
    if dtype == "int64":
        dims[1] = Dim("sequence", min=1)
    return (dims,)


def _example(sample_shape: tuple[int, ...], dtype: str):
    from tensorwire.trainer.models import example_input

    return example_input(sample_shape, dtype, batch=2)


def export_onnx(model, sample_shape: tuple[int, ...], path: Path, dtype: str = "float32") -> None:
    """One ONNX file with a dynamic batch dimension (and sequence dimension for token ids)."""
    import torch

    example = _example(sample_shape, dtype)
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
                dynamic_shapes=dynamic_shapes(dtype),
            )
        except ModuleNotFoundError as err:
            raise TrainerError(f"ONNX export needs {err.name!r} ({install_hint('train')})") from None
        except Exception as err:  # noqa: BLE001 - the exporter raises many types, with pages of detail
            raise TrainerError(f"ONNX export failed: {_first_line(err)}") from err
    if path.with_name(path.name + ".data").exists():
        raise TrainerError(f"{path}: the exporter wrote external weights; expected one self-contained file")


def export_torchscript(model, sample_shape: tuple[int, ...], path: Path, dtype: str = "float32") -> None:
    """A traced TorchScript file (deprecated upstream, kept because users ask for it)."""
    import torch

    example = _example(sample_shape, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; our users still ask for it
        try:
            traced = torch.jit.trace(model, example)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways (e.g. data-dependent control flow)
            raise TrainerError(f"TorchScript tracing failed: {_first_line(err)}") from err
        torch.jit.save(traced, str(path))


def exported_program(model, sample_shape: tuple[int, ...], dtype: str = "float32"):
    """``torch.export.export`` of ``model`` with dynamic batch (and sequence) dimensions."""
    import torch

    with _quiet_exporter(), torch.no_grad():
        try:
            return torch.export.export(model, (_example(sample_shape, dtype),), dynamic_shapes=dynamic_shapes(dtype))
        except Exception as err:  # noqa: BLE001 - torch.export raises many types, with pages of detail
            raise TrainerError(f"torch.export failed: {_first_line(err)}") from err


def export_pt2(model, sample_shape: tuple[int, ...], path: Path, dtype: str = "float32") -> None:
    """A ``torch.export`` program saved with ``torch.export.save`` (load: ``torch.export.load``)."""
    import torch

    program = exported_program(model, sample_shape, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))


def cxx_compiler() -> str | None:
    """The C++ compiler AOTInductor would use (``CXX``, else c++/g++/clang++ on PATH), or None."""
    import os
    import shutil

    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def export_aoti(model, sample_shape: tuple[int, ...], path: Path, dtype: str = "float32") -> None:
    """An AOTInductor package: the exported program compiled to native code for this machine's CPU
    (or the model's GPU). Raises TrainerError when no C++ compiler is found or compilation fails."""
    import torch

    if cxx_compiler() is None:
        raise TrainerError(
            "AOTInductor needs a C++ compiler (g++ or clang++, or CXX=...) and none was found; "
            "export --formats pt2 for a torch.export program that needs none"
        )
    program = exported_program(model, sample_shape, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet_exporter(), _captured_stderr(path.with_name("aoti_compile_error.log"), "compiler"):
        try:
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
        except Exception as err:  # noqa: BLE001 - the compiler fails in many ways
            raise TrainerError(f"AOTInductor compilation failed: {_first_line(err)}") from err


def load_pt2(path: Path):
    """A callable for a ``.pt2`` torch.export program: tensor in, tensor out."""
    import torch

    return torch.export.load(str(path)).module()


def load_aoti(path: Path):
    """A callable for an AOTInductor package: tensor in, tensor out."""
    import torch

    runner = torch._inductor.aoti_load_package(str(path))

    def run(x):
        out = runner(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    return run


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
    """Random inputs on the scale of the real data (a CNN fed huge values only checks overflow).

    Token ids (int64 reference): for each batch size, batches at the training length and at
    :data:`VERIFY_LENGTHS`, each row right-padded with 0 after a random number of tokens.
    Yields (label, batch)."""
    rng = np.random.default_rng(seed)
    if reference.dtype == np.int64:
        vocab = int(reference.max()) + 1
        for size in sizes:
            for length in (sample_shape[0], *VERIFY_LENGTHS):
                x = rng.integers(1, vocab, size=(size, length), dtype=np.int64)
                keep = rng.integers(1, length + 1, size=size)
                x[np.arange(length)[None, :] >= keep[:, None]] = 0
                yield f"{size}x{length}", x
        return
    low, high = float(reference.min()), float(reference.max())
    for size in sizes:
        yield str(size), rng.uniform(low, high, size=(size, *sample_shape)).astype(np.float32)


def verify(
    run_model,
    eager,
    sample_shape: tuple[int, ...],
    sizes: list[int],
    reference: np.ndarray,
    tolerance: float,
    label: str,
) -> dict[str, float]:
    """Max abs difference of logits per batch size (token models: per batch size x length); raise if
    any exceeds ``tolerance``."""
    diffs: dict[str, float] = {}
    for size, x in _random_batches(sample_shape, sizes, reference):
        try:
            got = run_model(x)
        except Exception as err:  # noqa: BLE001 - any runtime failure means the export is unusable
            raise TrainerError(f"{label} fails on a batch of {size}: {str(err).strip().splitlines()[0]}") from None
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


def _write(fmt: str, model, shape: tuple[int, ...], dtype: str, run: RunFolder):
    """Write one format; returns (path, a numpy-in numpy-out runner of the written file, label)."""
    import torch

    if fmt == "onnx":
        export_onnx(model, shape, run.onnx, dtype)
        session = onnx_session(run.onnx)
        return run.onnx, lambda x: predict_onnx(session, x), "ONNX model"
    if fmt == "torchscript":
        export_torchscript(model, shape, run.torchscript, dtype)
        loaded = torch.jit.load(str(run.torchscript))
        return run.torchscript, lambda x: predict_torch(loaded, x), "TorchScript model"
    if fmt == "pt2":
        export_pt2(model, shape, run.pt2, dtype)
        program = load_pt2(run.pt2)
        return run.pt2, lambda x: predict_torch(program, x), "torch.export program"
    export_aoti(model, shape, run.aoti, dtype)
    package = load_aoti(run.aoti)
    return run.aoti, lambda x: predict_torch(package, x), "AOTInductor package"


def export(opts: ExportOptions) -> dict[str, Any]:
    """Write the requested formats into ``<run>/export`` and a report of their parity and accuracy.

    Raises TrainerError for an unknown format, an export that fails, or a file whose logits differ
    from the eager model's by more than ``--tolerance``."""
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
    dtype = spec.get("input_dtype", "float32")
    if splits.tokenizer is not None:  # clients need it to turn text into the model's token ids
        run.export_dir.mkdir(parents=True, exist_ok=True)
        splits.tokenizer.save(str(run.tokenizer))
        report["tokenizer"] = str(run.tokenizer)
    for fmt in FORMATS:
        if fmt not in opts.formats:
            continue
        path, runner, label = _write(fmt, model, shape, dtype, run)
        diffs = verify(runner, model, shape, opts.verify_batch_sizes, splits.train.x, opts.tolerance, label)
        report[fmt] = {"file": str(path), "max_abs_diff": diffs, "accuracy": accuracy(runner(test.x), test.y)}
    write_json(run.export_report, report)
    return report
