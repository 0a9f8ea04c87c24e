"""The one console script, ``tensorwire``: a table of subcommands, each owned by one part.

Subcommands are imported lazily so that ``tensorwire infer`` never loads the
server or torch, and ``tensorwire serve`` never loads the client.
"""

from __future__ import annotations

import importlib
import sys

#: subcommand -> (module, function, one-line help). Each function takes the
#: arguments after the subcommand and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": (
        "tensorwire.server.cli",
        "main",
        "serve a model repository over gRPC (Open Inference Protocol)",
    ),
    "fit": ("tensorwire.trainer.cli", "fit", "train a model with PyTorch DDP (torchrun-style launch)"),
    "export": (
        "tensorwire.trainer.cli",
        "export",
        "export a checkpoint to ONNX, TorchScript, torch.export (.pt2) or AOTInductor, verified",
    ),
    "quantize": (
        "tensorwire.trainer.cli",
        "quantize",
        "INT8-quantize an ONNX model and report accuracy vs FP32",
    ),
    "publish": ("tensorwire.trainer.cli", "publish", "write a servable version into a model repository"),
    "train": ("tensorwire.trainer.cli", "train", "fit, export, quantize and publish in one go"),
    "prune": ("tensorwire.trainer.cli", "prune", "prune a run (structured or unstructured) with DDP fine-tuning"),
    "distill": ("tensorwire.trainer.cli", "distill", "train a smaller student on a teacher run's soft targets (DDP)"),
    "infer": ("tensorwire.client.cli", "infer", "send an inference request from .npy/.npz/JSON files"),
    "health": ("tensorwire.client.cli", "health", "check server and model liveness/readiness"),
    "metadata": ("tensorwire.client.cli", "metadata", "show server or model metadata and config"),
    "bench": ("tensorwire.loadtest.bench", "main", "closed-loop benchmark: throughput, latency, batch sizes"),
    "build-default-repo": (
        "tensorwire.trainer.default_repo",
        "main",
        "train and publish the default digits models into a repository (used by 'make serve')",
    ),
}


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = [f"  {name:<{width}}  {help_text}" for name, (_, _, help_text) in sorted(SUBCOMMANDS.items())]
    return (
        "usage: tensorwire <command> [options]\n\ncommands:\n"
        + "\n".join(lines)
        + ("\n\nRun 'tensorwire <command> --help' for a command's options.")
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from tensorwire import __version__

        print(__version__)
        return 0
    entry = SUBCOMMANDS.get(args[0])
    if entry is None:
        print(f"tensorwire: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = entry
    return int(getattr(importlib.import_module(module), function)(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
