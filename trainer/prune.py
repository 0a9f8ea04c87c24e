"""``tensorwire prune``: iterative prune -> fine-tune of a trained run, into a new run folder.

* ``structured`` (default): dependency-aware removal of whole output channels, hidden units
  and feed-forward units with the ``torch-pruning`` library (its dependency graph keeps residual
  additions, batch norms and the layers that consume a pruned layer consistent). The layers
  really shrink, so dense kernels do less work. The classifier's output layer is never pruned.
  Channel importance is the group's L2 (or L1) weight norm. For Transformers, torch-pruning 1.6
  removes feed-forward units and (token Transformer) model width, narrowing every head; it does
  not remove whole ``nn.MultiheadAttention`` heads.
* ``unstructured``: global magnitude pruning of weight matrices and kernels with
  ``torch.nn.utils.prune``: the smallest weights become exact zeros and stay zero while
  fine-tuning. On dense CPU kernels this changes neither size nor speed, only the number of
  non-zeros (the report says so).

Each of ``--steps`` rounds removes an equal share of the way to ``--keep`` (a fraction of the
parent's parameters or FLOPs), then fine-tunes for ``--finetune-epochs`` with DDP through the
same launcher as ``fit``. The result is a normal run folder (``best.pt`` + the pruned structure
in its ``model_spec``) that ``export``, ``quantize`` and ``publish`` take unchanged;
``prune_report.json`` records every round.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

from tensorwire.trainer.config import LAUNCH_FIELDS, FitOptions, PruneOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint, save_checkpoint, write_json

#: torch-pruning removes at most this fraction of any layer's channels (a layer is never emptied).
MAX_CHANNEL_RATIO = 0.95
#: Pruning advances in this many small steps, so a round stops close to its target.
PRUNER_STEPS = 100


def _check(opts: PruneOptions) -> None:
    if not opts.source:
        raise TrainerError("--source is required: the run folder of the trained model to prune")
    if not 0 < opts.keep < 1:
        raise TrainerError(f"--keep must be between 0 and 1 (got {opts.keep})")
    for name in ("steps", "finetune_epochs", "nproc_per_node", "threads_per_rank", "round_to"):
        if getattr(opts, name) < 1:
            raise TrainerError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(opts, name)})")
    if opts.lr < 0 or opts.batch_size < 0:
        raise TrainerError("--lr and --batch-size must not be negative")
    if Path(opts.run).resolve() == Path(opts.source).resolve():
        raise TrainerError("--run must be a new folder, not the --source run")


def measure(model, example, target: str) -> float:
    """Parameters (count) or FLOPs (multiply-accumulates for ``example``, torch-pruning's counter)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return float(params if target == "params" else macs)


def _classifier_layers(model, num_classes: int) -> list:
    """The output layer(s): a Linear producing the logits is never pruned."""
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _round_to(model, requested: int) -> int | None:
    """Channel-count multiple: ``requested``, made a multiple of every attention layer's head count
    (pruning an attention layer's width must leave each head a whole number of features)."""
    from torch import nn

    step = max(1, requested)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            step = math.lcm(step, module.num_heads)
    return step if step > 1 else None


def _pruner(model, example, opts: PruneOptions, num_classes: int):
    import torch_pruning as tp

    importance = tp.importance.GroupMagnitudeImportance(p=2 if opts.importance == "l2" else 1)
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=MAX_CHANNEL_RATIO,
        iterative_steps=PRUNER_STEPS,
        ignored_layers=_classifier_layers(model, num_classes),
        round_to=_round_to(model, opts.round_to),
    )


def _structured_round(model, pruner, example, opts: PruneOptions, goal: float) -> None:
    """Advance the pruner until the measure reaches ``goal`` (or the pruner has nothing left)."""
    while measure(model, example, opts.target) > goal and pruner.current_step < pruner.iterative_steps:
        pruner.step()


def _unstructured_round(model, fraction_zero: float) -> None:
    """Globally zero the smallest-magnitude weights until ``fraction_zero`` of them are zero."""
    import torch.nn.utils.prune as torch_prune
    from torch import nn

    weights = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d))]
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=fraction_zero)
    for module, name in weights:
        torch_prune.remove(module, name)  # bake the mask into the weight: plain zeros, plain state dict


def _fit_options(opts: PruneOptions, parent: dict[str, Any], explicit: set[str]) -> FitOptions:
    """The parent's fit options (same data split, model, optimizer), with prune's own settings."""
    known = {f.name for f in dataclasses.fields(FitOptions)}
    values = {k: v for k, v in parent.items() if k in known}
    values.update({name: getattr(opts, name) for name in LAUNCH_FIELDS})
    values.update(
        run=opts.run,
        epochs=opts.finetune_epochs,
        resume=False,
        overwrite=True,
        stop_after_epochs=0,
        patience=0,
        lr=opts.lr or (parent["lr"] or _default_lr(parent["optimizer"])) / 10,
        lr_schedule="cosine",
    )
    if opts.batch_size:
        values["batch_size"] = opts.batch_size
    return FitOptions(**values)


def _default_lr(optimizer: str) -> float:
    from tensorwire.trainer.training import DEFAULT_LR

    return DEFAULT_LR[optimizer]


#: A pruned model more than this many points of validation accuracy below its parent gets a warning.
ACCURACY_WARNING_POINTS = 1.0


def accuracy_warning(report: dict[str, Any]) -> str | None:
    """One line when ``report``'s final validation accuracy is more than :data:`ACCURACY_WARNING_POINTS`
    points below the parent's, saying what to try; None otherwise."""
    drop = 100 * (report["parent_val_accuracy"] - report["val_accuracy"])
    if drop <= ACCURACY_WARNING_POINTS:
        return None
    return (
        f"warning: the pruned model's val_accuracy is {drop:.1f} points below its parent's "
        f"({report['parent_val_accuracy']:.4f} -> {report['val_accuracy']:.4f}); try more fine-tuning "
        f"(--finetune-epochs, {report['finetune_epochs']} now), a higher --lr (default: a tenth of the parent's), "
        f"more --steps ({report['steps']} now) or a larger --keep ({report['keep']:g} now)"
    )


def prune(opts: PruneOptions, explicit: set[str] | None = None) -> dict[str, Any]:
    """Prune ``--source``'s best model into ``--run``; returns the report (also in prune_report.json)."""
    import torch

    from tensorwire.trainer.artifacts import load_trained
    from tensorwire.trainer.launch import fit
    from tensorwire.trainer.models import build_from_spec, example_input
    from tensorwire.trainer.structure import count_nonzero, count_parameters, structure_diff

    _check(opts)
    source, run = RunFolder.at(opts.source), RunFolder.at(opts.run)
    if run.checkpoint.exists() and not opts.overwrite:
        raise TrainerError(f"{run.root} already holds a checkpoint: pass --overwrite to replace it")
    model, state = load_trained(source.best)
    spec = state["model_spec"]  # a pruned parent's structure is the start; the new one is relative to a fresh build
    example = example_input(spec["input_shape"], spec.get("input_dtype", "float32"))
    model.eval()
    start = {"params": count_parameters(model), "flops": measure(model, example, "flops")}
    start_nonzero = count_nonzero(model)
    pruner = _pruner(model, example, opts, spec["num_classes"]) if opts.method == "structured" else None
    fit_opts = _fit_options(opts, state["config"], explicit or set())
    run.root.mkdir(parents=True, exist_ok=True)
    init = run.root / "prune_init.pt"
    rounds: list[dict[str, Any]] = []
    for step in range(1, opts.steps + 1):
        share = 1 - (1 - opts.keep) * step / opts.steps  # what is left after this round
        model.eval()
        with torch.no_grad():
            if pruner is not None:
                _structured_round(model, pruner, example, opts, share * start[opts.target])
            else:
                _unstructured_round(model, 1 - share)
        fresh = build_from_spec(spec)
        structure = structure_diff(fresh, model)
        save_checkpoint({"epoch": 0, "model": model.state_dict(), "config": state["config"], "model_spec": spec}, init)
        extra: dict[str, Any] = {"init_from": str(init.resolve())}
        if structure["attrs"] or structure["shapes"]:
            extra["structure"] = structure
        if opts.method == "unstructured":
            extra["keep_zeros"] = True
        summary = fit(fit_opts, extra=extra)
        if summary.get("on_other_node"):
            raise TrainerError("prune needs the run folder on the machine running rank 0 (or shared storage)")
        model.load_state_dict(load_checkpoint(run.best)["model"])  # fine-tuned weights, same shapes
        rounds.append(
            {
                "round": step,
                "params": count_parameters(model),
                "nonzero_params": count_nonzero(model),
                "flops": measure(model.eval(), example, "flops"),
                "best_val_accuracy": summary["best_val_accuracy"],
            }
        )
    init.unlink(missing_ok=True)
    final = rounds[-1]
    report = {
        "source": str(source.best.resolve()),
        "method": opts.method,
        "target": opts.target,
        "keep": opts.keep,
        "steps": opts.steps,
        "finetune_epochs": opts.finetune_epochs,
        "parent_params": start["params"],
        "parent_nonzero_params": start_nonzero,
        "parent_flops": start["flops"],
        "parent_val_accuracy": state["metrics"]["val_accuracy"],
        "params": final["params"],
        "nonzero_params": final["nonzero_params"],
        "flops": final["flops"],
        "params_kept": final["params"] / start["params"],
        "nonzero_kept": final["nonzero_params"] / max(start_nonzero, 1),
        "flops_kept": final["flops"] / start["flops"],
        "val_accuracy": final["best_val_accuracy"],
        "rounds": rounds,
        "note": (
            "unstructured pruning zeroes weights: parameter count, file size and dense-kernel speed are unchanged"
            if opts.method == "unstructured"
            else "structured pruning: layers are smaller; export, quantize and publish take this run unchanged"
        ),
    }
    shutil.rmtree(run.export_dir, ignore_errors=True)
    write_json(run.root / "prune_report.json", report)
    return report
