"""Pieces of the training loop that do not depend on torch.distributed: optimizer,
schedule, augmentation, L1 penalty. Kept apart so they are easy to read and test."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_LR = {"adamw": 3e-3, "sgd": 0.05}


def make_optimizer(
    model: nn.Module, name: str, lr: float, l2: float, momentum: float
) -> torch.optim.Optimizer:
    """L2 (weight decay) on weights only: decaying biases and norm scales only hurts."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": l2}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr)


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, lr: float, epochs: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule (its state is plain numbers, so checkpoints stay weights_only-loadable)."""
    total = max(1, epochs * steps_per_epoch)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=lr * 0.01)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    if name == "step":  # x0.1 at one third and two thirds of training
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, math.ceil(total / 3)), gamma=0.1)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def l1_penalty(model: nn.Module) -> torch.Tensor:
    """sum |w| over weight matrices and kernels (not biases or norm scales)."""
    return sum(p.abs().sum() for p in model.parameters() if p.dim() > 1)  # type: ignore[return-value]


def default_shift(sample_shape: tuple[int, ...]) -> int:
    """A shift of about an eighth of the image: 1 px on 8x8 digits, 4 px on 32x32."""
    return max(1, round(sample_shape[-2] / 8))


def augment_images(x: torch.Tensor, generator: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Random shift (zero-pad by ``shift``, crop back at a random offset per sample) and
    optional horizontal flips, for a batch shaped (B, C, H, W)."""
    batch, _, height, width = x.shape
    if flip:
        mask = torch.rand(batch, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if shift > 0:
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (batch,), generator=generator)
        dx = torch.randint(0, 2 * shift + 1, (batch,), generator=generator)
        rows = (dy[:, None] + torch.arange(height)[None, :])[:, None, :, None]  # B,1,H,1
        cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, None, :]  # B,1,1,W
        index = torch.arange(batch)[:, None, None, None]
        channels = torch.arange(x.shape[1])[None, :, None, None]
        x = padded[index, channels, rows, cols]
    return x
