"""Run folders holding briefly trained models, made in-process (no DDP) for export and serving tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tensorwire.trainer.config import FitOptions
from tensorwire.trainer.data import load_splits
from tensorwire.trainer.models import build_model
from tensorwire.trainer.runfolder import RunFolder, save_checkpoint
from tensorwire.trainer.worker import model_spec


def quick_run(root: Path, data: str, model: str, steps: int = 10, **options) -> RunFolder:
    """A run folder whose best.pt holds ``model`` after ``steps`` AdamW steps on ``data``'s training split."""
    fit = FitOptions(data=data, model=model, run=str(root), **options)
    config = dataclasses.asdict(fit)
    splits = load_splits(fit.data_spec())
    spec = model_spec(config, splits)
    torch.manual_seed(0)
    net = build_model(model, spec["input_shape"], spec["num_classes"], spec["kwargs"], dropout=0.1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    for step in range(steps):
        start = (step * 64) % max(1, len(y) - 64)
        loss = torch.nn.functional.cross_entropy(net(x[start : start + 64]), y[start : start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = RunFolder.at(root)
    save_checkpoint(
        {"epoch": 1, "model": net.state_dict(), "config": config, "model_spec": spec, "metrics": {"val_accuracy": 0.0}},
        run.best,
    )
    return run
