"""The one console script, ``tensorwire``: a table of subcommands, each owned by one part.

Subcommands are imported lazily so that ``tensorwire infer`` never loads the
server or torch, and ``tensorwire serve`` never loads the client. A subcommand
whose optional dependencies (a pip "extra") are not installed is listed apart
and, when run, says which extra to install instead of failing on an import.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from tensorwire.install_hint import install_hint

#: pip extra -> the top-level modules its subcommands import (module names, not distribution names).
EXTRAS: dict[str, tuple[str, ...]] = {
    "client": (),  # the base install: grpcio, protobuf, numpy
    "server": ("onnxruntime", "prometheus_client", "pydantic", "grpc_health", "grpc_reflection"),
    "train": ("torch", "onnx", "onnxscript", "onnxruntime", "sklearn", "tqdm", "tomli_w", "pydantic"),
    "loadtest": ("rich",),
}

#: subcommand -> (module, function, extra, one-line help). Each function takes the
#: arguments after the subcommand and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str, str, str]] = {
    "serve": (
        "tensorwire.server.cli",
        "main",
        "server",
        "serve a model repository over gRPC and HTTP/REST (Open Inference Protocol / KServe v2)",
    ),
    "fit": ("tensorwire.trainer.cli", "fit", "train", "train a model with PyTorch DDP (torchrun-style launch)"),
    "export": (
        "tensorwire.trainer.cli",
        "export",
        "train",
        "export a checkpoint to ONNX, TorchScript, torch.export (.pt2) or AOTInductor, verified",
    ),
    "quantize": (
        "tensorwire.trainer.cli",
        "quantize",
        "train",
        "INT8-quantize an ONNX model and report accuracy vs FP32",
    ),
    "publish": (
        "tensorwire.trainer.cli",
        "publish",
        "train",
        "write a servable version into a model repository",
    ),
    "train": ("tensorwire.trainer.cli", "train", "train", "fit, export, quantize and publish in one go"),
    "prune": (
        "tensorwire.trainer.cli",
        "prune",
        "train",
        "prune a run (structured or unstructured) with DDP fine-tuning",
    ),
    "distill": (
        "tensorwire.trainer.cli",
        "distill",
        "train",
        "train a smaller student on a teacher run's soft targets (DDP)",
    ),
    "infer": ("tensorwire.client.cli", "infer", "client", "send an inference request from .npy/.npz/JSON files"),
    "health": ("tensorwire.client.cli", "health", "client", "check server and model liveness/readiness"),
    "metadata": ("tensorwire.client.cli", "metadata", "client", "show server or model metadata and config"),
    "index": ("tensorwire.client.cli", "index", "client", "list the server's models with state and reason"),
    "load": ("tensorwire.client.cli", "load", "client", "load (or reload) models from the server's repository"),
    "unload": ("tensorwire.client.cli", "unload", "client", "unload models from the server"),
    "bench": (
        "tensorwire.loadtest.bench",
        "main",
        "loadtest",
        "closed-loop benchmark: throughput, latency, batch sizes",
    ),
    "build-default-repo": (
        "tensorwire.trainer.default_repo",
        "main",
        "train",
        "train and publish the default digits models into a repository (used by 'make serve')",
    ),
}

#: Exit code after the reader of stdout went away (``tensorwire metadata | head``): 128 + SIGPIPE,
#: what a shell reports for a command killed by a closed pipe.
EXIT_BROKEN_PIPE = 141


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing them)."""
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def _usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    ready, absent = [], []
    for name, (_, _, extra, help_text) in sorted(SUBCOMMANDS.items()):
        if missing_modules(extra):
            absent.append(f"  {name:<{width}}  needs the '{extra}' extra: {install_hint(extra)}")
        else:
            ready.append(f"  {name:<{width}}  {help_text}")
    text = "usage: tensorwire <command> [options]\n\ncommands:\n" + "\n".join(ready)
    if absent:
        text += "\n\nnot installed here:\n" + "\n".join(absent)
    return text + "\n\nRun 'tensorwire <command> --help' for a command's options."


def _not_installed(command: str, extra: str, missing: list[str]) -> int:
    print(
        f"tensorwire {command}: needs the '{extra}' extra, which is not installed here "
        f"(missing: {', '.join(missing)}): {install_hint(extra)}",
        file=sys.stderr,
    )
    return 2


def _run(command: str, args: list[str]) -> int:
    module, function, extra, _ = SUBCOMMANDS[command]
    missing = missing_modules(extra)
    if missing:
        return _not_installed(command, extra, missing)
    try:
        entry = getattr(importlib.import_module(module), function)
    except ModuleNotFoundError as error:  # a dependency of the extra that find_spec did not cover
        return _not_installed(command, extra, [error.name or str(error)])
    code = int(entry(args) or 0)
    sys.stdout.flush()  # a closed pipe shows here, inside main, not at interpreter exit
    return code


def main(argv: list[str] | None = None) -> int:
    """``tensorwire <command> ...``: run one subcommand; returns its exit code.

    Exit codes: the subcommand's own; 2 for an unknown command or a missing extra; 141 when
    stdout was closed by its reader (e.g. ``| head``), without a traceback.
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from tensorwire import __version__

        print(__version__)
        return 0
    if args[0] not in SUBCOMMANDS:
        print(f"tensorwire: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return _run(args[0], args[1:])
    except BrokenPipeError:
        # Python's documented recipe: point stdout at /dev/null so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
