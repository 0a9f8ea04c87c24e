"""``tensorwire build-default-repo``: the repository ``make serve`` serves on first use.

A digits CNN trained with 2 DDP processes, published three ways:

* ``digits_cnn``      ONNX FP32 (backend onnxruntime, model.onnx)
* ``digits_cnn_int8`` ONNX static INT8 (QDQ, per-channel)
* ``digits_cnn_ts``   TorchScript (backend torchscript, model.pt)

Input ``INPUT0`` FP32 [1, 8, 8] (pixels / 16, so 0..1), output ``OUTPUT0`` FP32 [10]
logits, max_batch_size 64. Models already in the repository are left alone, so
running it twice is cheap. About 30 s of CPU on a 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tensorwire.repository import DEFAULT_FILENAMES, available_versions
from tensorwire.trainer.config import ExportOptions, FitOptions, PublishOptions, QuantizeOptions
from tensorwire.trainer.errors import TrainerError

MODELS = {"digits_cnn": "onnx", "digits_cnn_int8": "int8", "digits_cnn_ts": "torchscript"}
BACKENDS = {"onnx": "onnxruntime", "int8": "onnxruntime", "torchscript": "torchscript"}

#: The training recipe: ~98 % test accuracy on digits in about 10 s of training on 2 cores.
RECIPE = dict(
    data="digits",
    model="cnn",
    model_args={"width": 16},
    epochs=10,
    patience=4,
    batch_size=64,
    optimizer="adamw",
    lr_schedule="cosine",
    seed=0,
)


def present(repo: Path, name: str, fmt: str) -> bool:
    """A model counts as present when a version folder holds its model file (and a config exists)."""
    model_dir = repo / name
    filename = DEFAULT_FILENAMES[BACKENDS[fmt]]
    return (model_dir / "config.toml").is_file() and any(
        (model_dir / str(v) / filename).is_file() for v in available_versions(model_dir)
    )


def build(repo: Path, workdir: Path, nproc: int = 2, force: bool = False, progress: bool = True) -> list[str]:
    """Train once and publish the missing models; returns the names published."""
    from tensorwire.trainer.export import export
    from tensorwire.trainer.launch import fit
    from tensorwire.trainer.publish import publish
    from tensorwire.trainer.quantize import quantize

    missing = {name: fmt for name, fmt in MODELS.items() if force or not present(repo, name, fmt)}
    if not missing:
        return []
    run = str(workdir / "digits_cnn")
    started = time.monotonic()
    summary = fit(FitOptions(**RECIPE, run=run, nproc_per_node=nproc, overwrite=True, progress=progress))
    print(
        f"build-default-repo: trained in {time.monotonic() - started:.0f} s, best val_accuracy "
        f"{summary['best_val_accuracy']:.4f}",
        flush=True,
    )
    formats = set(missing.values())
    export(ExportOptions(run=run, formats=["onnx"] + (["torchscript"] if "torchscript" in formats else [])))
    if "int8" in formats:
        report = quantize(QuantizeOptions(run=run, mode="static"))
        print(
            f"build-default-repo: INT8 test accuracy {report['int8_accuracy']:.4f} vs FP32 "
            f"{report['fp32_accuracy']:.4f}",
            flush=True,
        )
    options = PublishOptions(run=run, repo=str(repo))
    published = []
    for name, fmt in sorted(missing.items(), key=lambda item: item[1] == "int8"):
        result = publish(options, fmt=fmt, name=name)
        print(f"build-default-repo: {name} version {result['version']} -> {result['path']}", flush=True)
        published.append(name)
    return published


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tensorwire build-default-repo", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--repo", default="models", help="model repository to fill (default: models)")
    parser.add_argument(
        "--workdir", default=None, help="keep the training run here (default: a temporary folder)"
    )
    parser.add_argument("--nproc-per-node", type=int, default=2, help="DDP processes (default: 2)")
    parser.add_argument("--force", action="store_true", help="publish new versions even if the models exist")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    try:
        args = parser.parse_args(sys.argv[2:] if argv is None else list(argv))
    except SystemExit as stop:
        return int(stop.code or 0)
    repo = Path(args.repo)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="tensorwire-default-") as tmp:
            published = build(
                repo, Path(args.workdir or tmp), args.nproc_per_node, args.force, not args.no_progress
            )
    except TrainerError as err:
        print(f"tensorwire build-default-repo: error: {err}", file=sys.stderr)
        return 2
    if not published:
        print(f"build-default-repo: {repo} already holds {', '.join(MODELS)}; nothing to do")
    else:
        print(f"build-default-repo: {repo} ready in {time.monotonic() - started:.0f} s")
    return 0
