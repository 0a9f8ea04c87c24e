"""``tensorwire distill``: train a (smaller) student on a teacher run's soft targets, with DDP.

The student is any built-in family or ``package.module:factory`` with its own options; it is
trained exactly like ``fit`` (same launcher, DDP, checkpoints every epoch, ``--resume``, progress
on rank 0) on the teacher's data split, with the loss of Hinton et al. (2015): ``alpha`` x T^2 x
KL divergence between the temperature-T softmaxes of teacher and student, plus ``1 - alpha`` x
cross-entropy on the true labels. The teacher runs in eval mode on every rank and is never
updated. The result is a normal run folder that ``export``, ``quantize`` and ``publish`` take.
"""

from __future__ import annotations

from typing import Any

from tensorwire.trainer.config import DistillOptions, FitOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint

#: Fit options that define the data split: the student must see exactly the teacher's.
DATA_FIELDS = (
    "data",
    "input_shape",
    "num_classes",
    "num_samples",
    "label_column",
    "vocab_size",
    "max_length",
    "val_fraction",
    "test_fraction",
    "seed",
)


def student_options(fit_opts: FitOptions, explicit: set[str], teacher_config: dict[str, Any]) -> FitOptions:
    """``fit_opts`` with the teacher's data split; an explicitly different data option is an error."""
    for name in DATA_FIELDS:
        if name not in teacher_config:
            continue
        mine, theirs = getattr(fit_opts, name), teacher_config[name]
        if name in explicit and mine != theirs:
            raise TrainerError(
                f"--{name.replace('_', '-')} differs from the teacher's ({theirs!r}); the student trains "
                "and is tested on the teacher's data split (omit the option)"
            )
        setattr(fit_opts, name, theirs)
    return fit_opts


def distill(fit_opts: FitOptions, explicit: set[str], opts: DistillOptions) -> dict[str, Any]:
    """Train the student into ``fit_opts.run``; returns the fit summary plus the teacher's accuracy."""
    from tensorwire.trainer.launch import fit

    if opts.temperature <= 0:
        raise TrainerError(f"--temperature must be positive (got {opts.temperature})")
    if not 0 <= opts.alpha <= 1:
        raise TrainerError(f"--alpha must be between 0 and 1 (got {opts.alpha})")
    if fit_opts.resume:  # the teacher and loss settings come from the checkpoint
        if opts.teacher or {"temperature", "alpha"} & explicit:
            raise TrainerError("--resume continues with the checkpoint's teacher and loss settings; omit them")
        return fit(fit_opts, explicit)
    if not opts.teacher:
        raise TrainerError("--teacher is required: the run folder of the trained teacher")
    teacher = RunFolder.at(opts.teacher)
    if RunFolder.at(fit_opts.run).root.resolve() == teacher.root.resolve():
        raise TrainerError("--run must be a new folder, not the teacher's run")
    state = load_checkpoint(teacher.best)
    fit_opts = student_options(fit_opts, explicit, state["config"])
    settings = {"teacher": str(teacher.best.resolve()), "temperature": opts.temperature, "alpha": opts.alpha}
    summary = fit(fit_opts, explicit, extra={"distill": settings})
    return summary | {"teacher_val_accuracy": state["metrics"]["val_accuracy"]}
