"""The trainer's subcommands of the ``tensorwire`` script: fit, export, quantize, publish, train,
prune and distill.

Each function takes the arguments after the subcommand and returns an exit
code: 0 on success, 2 with one line ``tensorwire <command>: error: ...`` on a
problem the user can fix. Options come from flags or a TOML file
(``--config``); flags win. See :mod:`.options` for the precedence rules.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from tensorwire.trainer.config import (
    DistillOptions,
    ExportOptions,
    FitOptions,
    PruneOptions,
    PublishOptions,
    QuantizeOptions,
    TrainOptions,
)
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.options import add_options, check_config_keys, read_config_file, resolve

SECTIONS: dict[str, tuple[type, ...]] = {
    "fit": (FitOptions,),
    "export": (ExportOptions,),
    "quantize": (QuantizeOptions,),
    "publish": (PublishOptions,),
    "train": (TrainOptions,),
    "prune": (PruneOptions,),
    "distill": (FitOptions, DistillOptions),
}

DESCRIPTIONS = {
    "fit": "Train a model with PyTorch DDP: N worker processes through the elastic launcher "
    "(torchrun's machinery), gloo on CPU, NCCL on GPUs. Writes checkpoints every epoch, best.pt "
    "and a JSON-lines metrics log into the run folder.",
    "export": "Export the run's best checkpoint to ONNX (dynamic batch, one file) and TorchScript, "
    "each checked against the eager model on random batches.",
    "quantize": "INT8-quantize the run's ONNX model with ONNX Runtime and compare FP32 and INT8 "
    "accuracy on the held-out test split.",
    "publish": "Write the run's model into a model repository as the next version, with a generated config.toml.",
    "train": "fit, export, quantize and publish in one go: data and a model in, published repository entries out.",
    "prune": "Prune a trained run into a new run folder: structured (whole channels / hidden units, with "
    "torch-pruning's dependency graph, so dense kernels get faster) or unstructured (magnitude zeros), in "
    "--steps rounds of prune -> DDP fine-tune, to --keep of the parameters or FLOPs. The result is a normal "
    "run folder for export, quantize and publish.",
    "distill": "Knowledge distillation: train a student model (any family, its own options) with DDP on a "
    "teacher run's temperature-scaled soft targets plus the hard labels, on the teacher's data split. Takes "
    "fit's options; writes a normal run folder.",
}

EXAMPLES = {
    "fit": "example: tensorwire fit --data digits --model cnn --nproc-per-node 2 --run runs/digits",
    "export": "example: tensorwire export --run runs/digits",
    "quantize": "example: tensorwire quantize --run runs/digits",
    "publish": "example: tensorwire publish --run runs/digits --repo models --format int8",
    "train": "example: tensorwire train --data digits --nproc-per-node 2 --repo models --name digits_cnn",
    "prune": "example: tensorwire prune --source models/.build/digits_cnn --run runs/digits_pruned --keep 0.5 "
    "--steps 2 --finetune-epochs 6 --lr 0.001 --nproc-per-node 2",
    "distill": "example: tensorwire distill --teacher runs/digits --run runs/digits_student --model cnn "
    "--model-arg width=8 --epochs 10 --nproc-per-node 2",
}

#: Options of the single steps that ``train`` decides itself.
TRAIN_EXCLUDES = ("format", "formats", "version", "checkpoint")


def _parser(command: str, classes: Sequence[type]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"tensorwire {command}",
        description=DESCRIPTIONS[command],
        epilog=EXAMPLES[command],
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        default=None,
        help="read options from a TOML file: top-level keys, or [fit]/[export]/[quantize]/[publish] tables; flags win",
    )
    add_options(parser, classes, exclude=TRAIN_EXCLUDES if command == "train" else ())
    return parser


def _parse(command: str, argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any], str]:
    classes = (
        [cls for name in ("fit", "export", "quantize", "publish", "train") for cls in SECTIONS[name]]
        if command == "train"
        else list(SECTIONS[command])
    )
    args = vars(_parser(command, classes).parse_args(list(argv)))
    source = args.pop("config", None)
    config = read_config_file(source)
    check_config_keys(config, str(source), SECTIONS)
    return config, args, str(source)


def _run(command: str, argv: Sequence[str] | None, body: Callable[[dict, dict, str], None]) -> int:
    try:
        config, flags, source = _parse(command, sys.argv[2:] if argv is None else argv)
        body(config, flags, source)
    except SystemExit as stop:  # argparse: --help, or a usage error (already printed)
        return int(stop.code or 0)
    except TrainerError as err:
        print(f"tensorwire {command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tensorwire {command}: interrupted", file=sys.stderr)
        return 130
    return 0


def _fit(config: dict, flags: dict, source: str) -> dict[str, Any]:
    from tensorwire.trainer.launch import fit as run_fit

    opts, explicit = resolve(FitOptions, "fit", config, flags, source)
    summary = run_fit(opts, explicit)
    if summary.get("on_other_node"):
        print("fit: this machine's workers finished; the machine running rank 0 holds the checkpoints and log")
    else:
        print(
            f"fit: {summary['stopped']} after epoch {summary['last_epoch']}; best val_accuracy "
            f"{summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']} -> {opts.run}/best.pt"
        )
    return summary


def _export(config: dict, flags: dict, source: str, formats: list[str] | None = None) -> None:
    from tensorwire.trainer.export import export as run_export

    opts, _ = resolve(ExportOptions, "export", config, flags, source)
    if formats is not None:
        opts.formats = formats
    report = run_export(opts)
    for fmt in ("onnx", "torchscript", "pt2", "aoti"):
        if fmt in report:
            part = report[fmt]
            diffs = ", ".join(f"batch {b}: {d:.2g}" for b, d in part["max_abs_diff"].items())
            print(f"export: {part['file']}  max abs diff vs eager ({diffs})  test accuracy {part['accuracy']:.4f}")


def _quantize(config: dict, flags: dict, source: str) -> None:
    from tensorwire.trainer.quantize import quantize as run_quantize

    opts, _ = resolve(QuantizeOptions, "quantize", config, flags, source)
    report = run_quantize(opts)
    print(
        f"quantize: {report['mode']} INT8 -> {report['file']}  "
        f"test accuracy FP32 {report['fp32_accuracy']:.4f}, "
        f"INT8 {report['int8_accuracy']:.4f} (drop {report['accuracy_drop_points']:.2f} points, "
        f"top-1 agreement {report['top1_agreement']:.4f})"
    )
    if not report["within_threshold"]:
        print(
            f"quantize: warning: the drop exceeds {report['max_accuracy_drop']:g} points; "
            "publish will refuse this model unless --force",
            file=sys.stderr,
        )


def _publish(config: dict, flags: dict, source: str, fmt: str | None = None, name: str | None = None) -> None:
    from tensorwire.trainer.publish import publish as run_publish

    opts, explicit = resolve(PublishOptions, "publish", config, flags, source)
    result = run_publish(opts, fmt=fmt, name=name, explicit=explicit)
    print(
        f"publish: {result['name']} version {result['version']} ({result['backend']}, test accuracy "
        f"{result['accuracy']}) -> {result['path']}"
    )
    if result["kept_settings"]:
        print(
            f"publish: kept the serving settings of the existing {result['path'].rsplit('/', 1)[0]}/config.toml "
            f"(max_batch_size {result['max_batch_size']}, dynamic_batching, instance_group, version_policy, "
            "your metadata); edit that file or give the option (--max-batch-size ...) to change them"
        )


def _train(config: dict, flags: dict, source: str) -> None:
    from tensorwire.trainer.publish import FORMATS

    formats = resolve(TrainOptions, "train", config, flags, source)[0].publish_formats
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise TrainerError(
            f"--publish-formats: unknown format {unknown[0] if unknown else '(none)'!r}; use {', '.join(FORMATS)}"
        )
    base = resolve(PublishOptions, "publish", config, flags, source)[0].name
    if base:  # a bad name must fail now, not after training
        from tensorwire.repository import RepositoryConfigError, check_model_name

        try:
            check_model_name(base)
        except RepositoryConfigError as err:
            raise TrainerError(str(err)) from None
    if _fit(config, flags, source).get("on_other_node"):
        return  # export, quantize and publish happen where rank 0 wrote the checkpoints
    _export(config, flags, source, formats=["onnx"] + [f for f in ("torchscript", "pt2", "aoti") if f in formats])
    if "int8" in formats:
        _quantize(config, flags, source)
    # INT8 last: if it is refused for lost accuracy, the others are already published.
    for fmt in sorted(formats, key=lambda f: f == "int8"):
        _publish(config, flags, source, fmt=fmt, name=f"{base}{FORMATS[fmt][1]}" if base else None)


def _prune(config: dict, flags: dict, source: str) -> None:
    from tensorwire.trainer.prune import accuracy_warning
    from tensorwire.trainer.prune import prune as run_prune

    opts, explicit = resolve(PruneOptions, "prune", config, flags, source)
    report = run_prune(opts, explicit)
    for item in report["rounds"]:
        print(
            f"prune: round {item['round']}: {item['params']:,} parameters ({item['nonzero_params']:,} non-zero), "
            f"{item['flops']:,.0f} FLOPs, best val_accuracy {item['best_val_accuracy']:.4f}"
        )
    kept = report["nonzero_kept"] if report["method"] == "unstructured" else report["params_kept"]
    print(
        f"prune: {report['method']}: kept {kept:.1%} of the "
        f"{'non-zero ' if report['method'] == 'unstructured' else ''}parameters and "
        f"{report['flops_kept']:.1%} of the FLOPs; val_accuracy {report['parent_val_accuracy']:.4f} -> "
        f"{report['val_accuracy']:.4f} -> {opts.run}/best.pt"
    )
    if report["method"] == "unstructured":
        print("prune: note: zeros in dense tensors: file size and CPU speed stay as they were", file=sys.stderr)
    warning = accuracy_warning(report)
    if warning:
        print(f"prune: {warning}", file=sys.stderr)


def _distill(config: dict, flags: dict, source: str) -> None:
    from tensorwire.trainer.distill import distill as run_distill

    fit_opts, explicit = resolve(FitOptions, "distill", config, flags, source)
    opts, explicit_distill = resolve(DistillOptions, "distill", config, flags, source)
    summary = run_distill(fit_opts, explicit | explicit_distill, opts)
    if summary.get("on_other_node"):
        print("distill: this machine's workers finished; the machine running rank 0 holds the checkpoints")
        return
    teacher = summary.get("teacher_val_accuracy")
    print(
        f"distill: {summary['stopped']} after epoch {summary['last_epoch']}; student best val_accuracy "
        f"{summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']}"
        + (f" (teacher {teacher:.4f})" if teacher is not None else "")
        + f" -> {fit_opts.run}/best.pt"
    )


def fit(argv: Sequence[str] | None = None) -> int:
    return _run("fit", argv, _fit)


def prune(argv: Sequence[str] | None = None) -> int:
    return _run("prune", argv, _prune)


def distill(argv: Sequence[str] | None = None) -> int:
    return _run("distill", argv, _distill)


def export(argv: Sequence[str] | None = None) -> int:
    return _run("export", argv, _export)


def quantize(argv: Sequence[str] | None = None) -> int:
    return _run("quantize", argv, _quantize)


def publish(argv: Sequence[str] | None = None) -> int:
    return _run("publish", argv, _publish)


def train(argv: Sequence[str] | None = None) -> int:
    return _run("train", argv, _train)
