"""``tensorwire fit``: check everything that can be checked up front, then start the
workers with PyTorch's elastic launcher (what ``torchrun`` runs) and report.

Single machine: a standalone c10d rendezvous on a free port (like ``torchrun
--standalone``). Several machines: ``--nnodes N --rdzv-endpoint HOST:PORT`` on
each (c10d rendezvous, ranks assigned on arrival), or add ``--node-rank`` for a
static rendezvous where HOST:PORT is node 0's address.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

from tensorwire.trainer.config import RESUMABLE, FitOptions
from tensorwire.trainer.data import load_splits
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint, read_json, write_json


def _check(opts: FitOptions) -> None:
    positive = {
        "epochs": opts.epochs,
        "batch_size": opts.batch_size,
        "nproc_per_node": opts.nproc_per_node,
        "threads_per_rank": opts.threads_per_rank,
    }
    for name, value in positive.items():
        if value < 1:
            raise TrainerError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
    for name in ("lr", "l1", "l2", "dropout", "max_shift", "patience", "stop_after_epochs", "momentum"):
        if getattr(opts, name) < 0:
            raise TrainerError(f"--{name.replace('_', '-')} must not be negative (got {getattr(opts, name)})")
    if opts.dropout >= 1:
        raise TrainerError(f"--dropout must be below 1 (got {opts.dropout})")
    if opts.timeout <= 0:
        raise TrainerError("--timeout must be positive")


def _check_model(opts: FitOptions) -> None:
    """Load the data and build the model once here, so mistakes fail before any worker starts."""
    import torch

    from tensorwire.trainer.models import build_model, check_model, model_kwargs
    from tensorwire.trainer.worker import augmentation

    splits = load_splits(opts.data_spec())
    torch.manual_seed(0)
    model = build_model(
        opts.model,
        splits.sample_shape,
        splits.num_classes,
        model_kwargs(opts.model, opts.model_args, splits.vocab_size),
        dropout=opts.dropout,
        standardize=opts.standardize,
    )
    check_model(model, splits.sample_shape, splits.num_classes, opts.model, splits.dtype)
    if opts.standardize and splits.vocab_size:
        raise TrainerError("--standardize applies to float features, not to token ids")
    augmentation(dataclasses.asdict(opts), splits)  # raises for --augment on non-image data


def _resume_options(opts: FitOptions, explicit: set[str], run: RunFolder) -> FitOptions:
    """The checkpoint's options, with only the resumable ones taken from this command."""
    saved: dict[str, Any] = load_checkpoint(run.checkpoint)["config"]
    for name in sorted(explicit - RESUMABLE):
        mine = getattr(opts, name)
        if name in saved and saved[name] != mine:
            raise TrainerError(
                f"cannot resume {run.root} with a different --{name.replace('_', '-')} "
                f"(checkpoint: {saved[name]!r}, now: {mine!r})"
            )
    known = {f.name for f in dataclasses.fields(FitOptions)}
    merged = {k: v for k, v in saved.items() if k in known}
    merged.update({k: getattr(opts, k) for k in RESUMABLE if k in explicit})
    merged["resume"] = True
    return FitOptions(**merged)


def _nodes(spec: str) -> tuple[int, int]:
    low, _, high = spec.partition(":")
    try:
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise TrainerError(f"--nnodes must be N or MIN:MAX (got {spec!r})") from None
    if not 0 < low_n <= high_n:
        raise TrainerError(f"--nnodes must be N or MIN:MAX with 0 < MIN <= MAX (got {spec!r})")
    return low_n, high_n


def launch_config(opts: FitOptions):
    """The elastic launcher's settings, as ``torchrun`` would derive them from the same flags."""
    from torch.distributed.launcher.api import LaunchConfig

    low, high = _nodes(opts.nnodes)
    configs: dict[str, Any] = {"timeout": int(opts.timeout)}
    if high == 1 and not opts.rdzv_endpoint:
        backend, endpoint, run_id = "c10d", "localhost:0", str(uuid.uuid4())  # --standalone
    else:
        if not opts.rdzv_endpoint:
            raise TrainerError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
        backend, endpoint, run_id = "c10d", opts.rdzv_endpoint, opts.rdzv_id
        if opts.node_rank >= 0:
            backend = "static"
            configs["rank"] = opts.node_rank
    return LaunchConfig(
        min_nodes=low,
        max_nodes=high,
        nproc_per_node=opts.nproc_per_node,
        run_id=run_id,
        role="tensorwire-fit",
        rdzv_endpoint=endpoint,
        rdzv_backend=backend,
        rdzv_configs=configs,
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )


def _failure_message(err: Exception) -> str:
    root = err.get_first_failure()[1] if hasattr(err, "get_first_failure") else None
    if root is None:
        return str(err).strip().splitlines()[-1]
    message = root.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    detail = lines[-1] if lines else f"exit code {root.exitcode}"
    detail = detail.removeprefix("TrainerError: ")
    if "To enable traceback" in detail:
        detail = f"exit code {root.exitcode} (its output is above)"
    return f"worker (local rank {root.local_rank}) failed: {detail}"


def _uses_cuda(opts: FitOptions) -> bool:
    import torch

    if opts.device == "cuda" and not torch.cuda.is_available():
        raise TrainerError("--device cuda, but no CUDA device is visible")
    return opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())


#: Settings that ``prune`` and ``distill`` hand the workers beside the fit options (kept on resume).
EXTRA_KEYS = ("init_from", "structure", "keep_zeros", "distill")


def fit(opts: FitOptions, explicit: set[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train; returns the fit summary (best validation accuracy, epochs run, how it stopped).

    ``extra`` carries what prune and distill add to a fit (keys in :data:`EXTRA_KEYS`): initial
    weights (``init_from``, a checkpoint path), a pruned ``structure``, ``keep_zeros`` (unstructured
    pruning's zeros stay zero) and ``distill`` (teacher checkpoint, temperature, alpha).
    On a machine that did not run global rank 0 (and does not share the run folder), the
    summary says only ``on_other_node``: checkpoints and logs are written by rank 0.
    """
    explicit = explicit or set()
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        raise ValueError(f"unknown extra fit settings {unknown}")
    _check(opts)
    run = RunFolder.at(opts.run)
    if opts.resume:
        saved = load_checkpoint(run.checkpoint)["config"]
        extra = {key: saved[key] for key in EXTRA_KEYS if key in saved} | extra
        opts = _resume_options(opts, explicit, run)
        _check(opts)
    elif run.checkpoint.exists():
        if not opts.overwrite:
            raise TrainerError(
                f"{run.root} already holds a checkpoint: pass --resume to continue it or --overwrite to start afresh"
            )
        for path in (run.checkpoint, run.best, run.metrics, run.fit_summary):
            path.unlink(missing_ok=True)
        shutil.rmtree(run.export_dir, ignore_errors=True)
    _check_model(opts)
    if _uses_cuda(opts):
        import torch

        if opts.nproc_per_node > torch.cuda.device_count():
            raise TrainerError(f"--nproc-per-node {opts.nproc_per_node} exceeds the {torch.cuda.device_count()} GPUs")
    run.root.mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(opts) | {"run": str(run.root.resolve())} | extra
    write_json(run.fit_config, config)
    run.fit_summary.unlink(missing_ok=True)
    _start_workers(opts, run.fit_config)
    if not run.fit_summary.exists():  # another machine ran global rank 0, and the run folder is not shared
        return {"stopped": "completed", "on_other_node": True}
    return read_json(run.fit_summary, "written by rank 0 when training ends")


def _start_workers(opts: FitOptions, config_path: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = launch_config(opts)
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(opts.threads_per_rank)  # read by each worker at start
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", "-m", "tensorwire.trainer.worker", str(config_path))
    except ChildFailedError as err:
        raise TrainerError(_failure_message(err)) from None
    except Exception as err:  # rendezvous errors and timeouts
        if type(err).__module__.startswith("torch.distributed"):
            raise TrainerError(f"launch failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from None
        raise
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
