"""``tensorwire build-default-repo``: the repository ``make serve`` serves on first use.

A digits CNN trained with 2 DDP processes, published three ways:

* ``digits_cnn``      ONNX FP32 (backend onnxruntime, model.onnx)
* ``digits_cnn_int8`` ONNX static INT8 (QDQ, per-channel, 7-bit weights)
* ``digits_cnn_ts``   TorchScript (backend torchscript, model.pt)

Input ``INPUT0`` FP32 [1, 8, 8] (pixels / 16, so 0..1), output ``OUTPUT0`` FP32 [10]
logits, max_batch_size 64. About 20 s on a 2-core machine.

The build never stops the main job: a model that misses its accuracy gate is
reported in one line and the others are published. Models already in the
repository are left alone, and the training run is kept (``<repo>/.build/`` by
default: hidden, so servers ignore it), so running it again neither retrains nor
fails again: it takes well under a second when everything is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorwire.repository import DEFAULT_FILENAMES, available_versions
from tensorwire.trainer.config import ExportOptions, FitOptions, PublishOptions, QuantizeOptions
from tensorwire.trainer.errors import TrainerError

MODELS = {"digits_cnn": "onnx", "digits_cnn_int8": "int8", "digits_cnn_ts": "torchscript"}
BACKENDS = {"onnx": "onnxruntime", "int8": "onnxruntime", "torchscript": "torchscript"}

#: Where the training run is kept, inside the repository (hidden: not a model for any server).
BUILD_DIR = ".build"

#: The training recipe: ~98 % test accuracy on digits in about 10 s of training on 2 cores.
#: Weights depend on the CPU's instruction set (see README, "What varies across machines").
RECIPE: dict[str, Any] = dict(
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

#: The INT8 recipe. ``reduce_range`` (7-bit weights) keeps ONNX Runtime's integer arithmetic exact on
#: every x86 CPU: without VNNI, its u8 x s8 kernels add pairs of products in 16 bits, which 8-bit
#: weights can overflow (255 * 127 * 2 > 32767), and the model served there then loses accuracy that
#: a VNNI machine never shows (measured: FP32 0.9814 -> INT8 0.9703 on AVX2 kernels, 0.9777 on VNNI).
QUANTIZE: dict[str, Any] = dict(mode="static", per_channel=True, reduce_range=True, calibration_samples=256)


@dataclass
class BuildResult:
    """What one build did: models published (name -> version) and models refused (name -> reason)."""

    published: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    trained: bool = False


def present(repo: Path, name: str, fmt: str) -> bool:
    """A model counts as present when a version folder holds its model file (and a config exists)."""
    model_dir = repo / name
    filename = DEFAULT_FILENAMES[BACKENDS[fmt]]
    return (model_dir / "config.toml").is_file() and any(
        (model_dir / str(v) / filename).is_file() for v in available_versions(model_dir)
    )


def _kept_run_matches(run: Path) -> bool:
    """Whether ``run`` holds a finished training of today's recipe (then it is reused, not retrained)."""
    try:
        config = json.loads((run / "fit_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    finished = (run / "best.pt").is_file() and (run / "fit_summary.json").is_file()
    return finished and all(config.get(key) == value for key, value in RECIPE.items())


def build(
    repo: Path,
    workdir: Path,
    nproc: int = 2,
    rebuild: bool = False,
    force: bool = False,
    progress: bool = True,
    log=print,
) -> BuildResult:
    """Train once (or reuse the kept run) and publish the models the repository lacks.

    Args:
        repo: the model repository folder (created if missing).
        workdir: where the training run lives (``workdir/digits_cnn``); kept afterwards.
        nproc: DDP worker processes.
        rebuild: retrain and publish a new version of every model, present or not.
        force: publish the INT8 model even when it misses the accuracy gate.
        progress: the trainer's progress bar (only on a terminal).
        log: where the one-line progress reports go.

    Returns:
        What was published and what was refused (with the reason, one line each).

    Raises:
        TrainerError: when training, export or publishing fails for a reason other than a model's
            accuracy gate (a missed gate is reported in ``refused``, never raised).
    """
    from tensorwire.trainer.export import export
    from tensorwire.trainer.launch import fit
    from tensorwire.trainer.publish import AccuracyGateError, publish
    from tensorwire.trainer.quantize import quantize
    from tensorwire.trainer.runfolder import RunFolder

    result = BuildResult()
    missing = {name: fmt for name, fmt in MODELS.items() if rebuild or not present(repo, name, fmt)}
    if not missing:
        return result
    run = RunFolder.at(workdir / "digits_cnn")
    reuse = not rebuild and _kept_run_matches(run.root)
    started = time.monotonic()
    if reuse:
        log(f"build-default-repo: reusing the training run in {run.root} (no retraining)")
    else:
        summary = fit(FitOptions(**RECIPE, run=str(run.root), nproc_per_node=nproc, overwrite=True, progress=progress))
        result.trained = True
        log(
            f"build-default-repo: trained in {time.monotonic() - started:.0f} s, best val_accuracy "
            f"{summary['best_val_accuracy']:.4f}"
        )
    formats = set(missing.values())
    wanted = {"onnx"} | ({"torchscript"} if "torchscript" in formats else set())
    have = {"onnx": run.onnx.is_file(), "torchscript": run.torchscript.is_file()}
    if not reuse or not all(have[fmt] for fmt in wanted):
        export(ExportOptions(run=str(run.root), formats=sorted(wanted)))
    if "int8" in formats:
        if not reuse or not (run.int8.is_file() and run.quantize_report.is_file()):
            report = quantize(QuantizeOptions(run=str(run.root), **QUANTIZE))
            log(
                f"build-default-repo: INT8 test accuracy {report['int8_accuracy']:.4f} vs FP32 "
                f"{report['fp32_accuracy']:.4f} (top-1 agreement {report['top1_agreement']:.4f})"
            )
    options = PublishOptions(run=str(run.root), repo=str(repo), force=force)
    for name, fmt in sorted(missing.items(), key=lambda item: item[1] == "int8"):
        try:
            published = publish(options, fmt=fmt, name=name)
        except AccuracyGateError as refusal:
            result.refused[name] = refusal.summary
            continue
        result.published[name] = published["version"]
        log(f"build-default-repo: {name} version {published['version']} -> {published['path']}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``tensorwire build-default-repo``: exit 0 when every model is served or was refused by its gate
    (reported in one line each); 2 when the build itself failed."""
    parser = argparse.ArgumentParser(
        prog="tensorwire build-default-repo",
        description="Train the default digits CNN and publish it as digits_cnn (ONNX), digits_cnn_int8 and "
        "digits_cnn_ts (TorchScript): the repository 'make serve' serves. Models already present are left "
        "alone; the training run is kept and reused. A model that misses its accuracy gate is reported in "
        "one line and the others are published (exit 0).",
    )
    parser.add_argument("--repo", default="models", help="model repository to fill (default: models)")
    parser.add_argument(
        "--workdir",
        default=None,
        help=f"keep the training run here (default: REPO/{BUILD_DIR}, hidden from servers)",
    )
    parser.add_argument("--nproc-per-node", type=int, default=2, help="DDP processes (default: 2)")
    parser.add_argument(
        "--rebuild",
        action="store_true",
        help="retrain and publish a new version of every default model, even those already present",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="publish the INT8 model even if it misses the accuracy gate (as 'tensorwire publish --force')",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    try:
        args = parser.parse_args(sys.argv[2:] if argv is None else list(argv))
    except SystemExit as stop:
        return int(stop.code or 0)
    repo = Path(args.repo)
    workdir = Path(args.workdir) if args.workdir else repo / BUILD_DIR
    started = time.monotonic()
    try:
        result = build(
            repo,
            workdir,
            args.nproc_per_node,
            rebuild=args.rebuild,
            force=args.force,
            progress=not args.no_progress,
            log=lambda line: print(line, flush=True),
        )
    except TrainerError as err:
        print(f"tensorwire build-default-repo: error: {err}", file=sys.stderr)
        return 2
    for name, reason in result.refused.items():
        print(
            f"build-default-repo: {name} not published, the others are served: {reason} "
            f"(tensorwire build-default-repo --repo {repo} --force publishes it anyway)",
            file=sys.stderr,
            flush=True,
        )
    if not result.published and not result.refused:
        print(f"build-default-repo: {repo} already holds {', '.join(MODELS)}; nothing to do")
    elif result.published:
        print(f"build-default-repo: {repo} ready in {time.monotonic() - started:.0f} s")
    return 0
