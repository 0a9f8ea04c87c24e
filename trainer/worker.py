"""One DDP worker process: ``python -m tensorwire.trainer.worker <run>/fit_config.json``.

Started by :mod:`tensorwire.trainer.launch` through PyTorch's elastic launcher,
which sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous address. Gloo on CPU
(one thread per rank unless told otherwise), NCCL on GPUs with bf16 autocast.
Rank 0 writes the checkpoint, best model, metrics log and the progress bar;
every decision (early stopping, when to stop) uses all-reduced numbers, so all
ranks take it together.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from tensorwire.trainer import training
from tensorwire.trainer.config import data_spec_from
from tensorwire.trainer.data import Split, Splits, load_splits
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.models import build_from_spec, model_kwargs
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint, save_checkpoint, write_json
from tensorwire.trainer.structure import apply_structure


@dataclass
class Context:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class EarlyStopping:
    best_val_accuracy: float = -1.0
    best_val_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, accuracy: float, loss: float) -> bool:
        """Record an epoch; True when it is the best so far (accuracy, then loss breaks ties)."""
        tie = accuracy == self.best_val_accuracy and loss < self.best_val_loss
        if accuracy > self.best_val_accuracy or tie:
            self.best_val_accuracy, self.best_val_loss, self.best_epoch = accuracy, loss, epoch
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    def state(self) -> dict[str, Any]:
        return {
            "best_val_accuracy": self.best_val_accuracy,
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
        }


@dataclass
class Totals:
    """Sums over this rank's samples, all-reduced into job-wide means."""

    loss: float = 0.0
    correct: float = 0.0
    count: float = 0.0

    def add(self, loss_sum: float, correct: float, count: int) -> None:
        self.loss += loss_sum
        self.correct += correct
        self.count += count

    def reduce(self, ctx: Context) -> tuple[float, float]:
        t = torch.tensor([self.loss, self.correct, self.count], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(t)
        loss, correct, count = t.tolist()
        return loss / max(count, 1), correct / max(count, 1)


def _die_with_launcher() -> None:
    """torch's elastic agent starts workers in their own session, so when the launcher is killed
    outright (SIGKILL, the OOM killer) they would train on as orphans, still writing into the
    run folder. On Linux, have the kernel send SIGTERM to this worker when its launcher dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the launcher died before we asked
        os._exit(1)


def _setup() -> tuple[Context, dict[str, Any]]:
    config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world = int(os.environ["WORLD_SIZE"])
    use_cuda = config["device"] == "cuda" or (config["device"] == "auto" and torch.cuda.is_available())
    if use_cuda:
        if torch.cuda.device_count() <= local_rank:
            raise TrainerError(f"rank {rank}: no CUDA device for local rank {local_rank}")
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        torch.set_num_threads(config["threads_per_rank"])
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=config["timeout"]), device_id=device if use_cuda else None
    )
    return Context(rank, local_rank, world, device), config


def _rng_state(ctx: Context) -> list[torch.Tensor]:
    state = [torch.get_rng_state()]
    if ctx.device.type == "cuda":
        state.append(torch.cuda.get_rng_state(ctx.device).cpu())
    return state


def _gather_rng(ctx: Context) -> list[list[torch.Tensor]]:
    """Every rank's RNG state (dropout draws differ per rank), for an exact resume."""
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, _rng_state(ctx))
    return gathered


def _restore_rng(ctx: Context, states: list[list[torch.Tensor]]) -> None:
    if len(states) != ctx.world:  # a different world size: fresh, but still deterministic, draws
        torch.manual_seed(1_000_003 * ctx.rank + len(states))
        return
    mine = states[ctx.rank]
    torch.set_rng_state(mine[0].cpu())
    if ctx.device.type == "cuda" and len(mine) > 1:
        torch.cuda.set_rng_state(mine[1].cpu(), ctx.device)


def _loader(split: Split, ctx: Context, per_rank_batch: int, seed: int) -> tuple[DataLoader, DistributedSampler]:
    """Whole batches are sliced from in-memory tensors (no per-sample collation)."""
    dataset = TensorDataset(torch.from_numpy(split.x), torch.from_numpy(split.y))
    sampler = DistributedSampler(dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    batches = BatchSampler(sampler, per_rank_batch, drop_last=False)
    return DataLoader(dataset, sampler=batches, batch_size=None), sampler


def _autocast(ctx: Context, config: dict[str, Any]):
    if ctx.device.type == "cuda" and config["bf16"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def evaluate(
    model: nn.Module, split: Split, ctx: Context, config: dict[str, Any], batch: int = 512
) -> tuple[float, float]:
    """Loss and accuracy over the whole split: each rank takes every world-th sample, then all-reduce."""
    totals = Totals()
    x, y = torch.from_numpy(split.x[ctx.rank :: ctx.world]), torch.from_numpy(split.y[ctx.rank :: ctx.world])
    model.eval()
    with torch.no_grad(), _autocast(ctx, config):
        for start in range(0, len(y), batch):
            xb, yb = x[start : start + batch].to(ctx.device), y[start : start + batch].to(ctx.device)
            logits = model(xb).float()
            totals.add(
                F.cross_entropy(logits, yb, reduction="sum").item(),
                (logits.argmax(1) == yb).sum().item(),
                len(yb),
            )
    return totals.reduce(ctx)


def _standardize(model: nn.Module, splits: Splits) -> None:
    x = torch.from_numpy(splits.train.x)
    model[0].mean.copy_(x.mean(0))
    model[0].std.copy_(x.std(0).clamp_min(1e-6))


def model_spec(config: dict[str, Any], splits: Splits) -> dict[str, Any]:
    """How to rebuild the network (name, options and, after structured pruning, the pruned
    shapes), stored beside its weights."""
    spec = {
        "name": config["model"],
        "kwargs": model_kwargs(config["model"], config["model_args"], splits.vocab_size),
        "dropout": config["dropout"],
        "input_shape": list(splits.sample_shape),
        "input_dtype": splits.dtype,
        "num_classes": splits.num_classes,
        "standardize": bool(config["standardize"]),
        "dataset": splits.name,
    }
    if splits.label_names:
        spec["label_names"] = list(splits.label_names)
    if config.get("structure"):
        spec["structure"] = config["structure"]
    return spec


def _progress(ctx: Context, config: dict[str, Any], total: int, epoch: int):
    from tqdm import tqdm

    show = ctx.main and config["progress"] and sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=f"epoch {epoch}/{config['epochs']}",
        leave=False,
        disable=not show,
        dynamic_ncols=True,
        unit="batch",
    )


class DistillLoss:
    """Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": ``alpha`` x T^2 x
    KL(teacher_T || student_T) on temperature-T soft targets, plus ``1 - alpha`` x cross-entropy on
    the hard labels. The T^2 factor keeps the soft term's gradients on the scale of the hard term's."""

    def __init__(self, teacher: nn.Module, temperature: float, alpha: float) -> None:
        self.teacher, self.temperature, self.alpha = teacher.eval(), temperature, alpha

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.softmax(self.teacher(inputs).float() / self.temperature, dim=1)
        log_student = F.log_softmax(logits / self.temperature, dim=1)
        kl = F.kl_div(log_student, soft, reduction="batchmean") * self.temperature**2
        return self.alpha * kl + (1 - self.alpha) * F.cross_entropy(logits, labels)


def _teacher(config: dict[str, Any], ctx: Context) -> DistillLoss | None:
    settings = config.get("distill")
    if not settings:
        return None
    from tensorwire.trainer.artifacts import load_trained

    teacher, _ = load_trained(Path(settings["teacher"]))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return DistillLoss(teacher.to(ctx.device), float(settings["temperature"]), float(settings["alpha"]))


@dataclass
class Job:
    """Everything one training run holds: data, model, optimizer, schedule. The DDP wrapper comes
    last, after a resumed run has loaded its weights (DDP broadcasts rank 0's weights when built)."""

    config: dict[str, Any]
    run: RunFolder
    splits: Splits
    spec: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    loader: DataLoader
    sampler: DistributedSampler
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    ddp: DistributedDataParallel | None = None
    #: Knowledge distillation (``tensorwire distill``): replaces plain cross-entropy.
    distill: DistillLoss | None = None
    #: Unstructured pruning: weights that must stay exactly zero while fine-tuning.
    masks: list[tuple[torch.Tensor, torch.Tensor]] | None = None


def augmentation(config: dict[str, Any], splits: Splits):
    """The batch transform for ``--augment`` (auto: random shifts for images, nothing otherwise)."""
    image = splits.is_image
    kind = config["augment"] if config["augment"] != "auto" else ("shift" if image else "none")
    if kind == "none":
        return None
    if not image:
        raise TrainerError(f"--augment {kind} needs image samples (C, H, W); got {list(splits.sample_shape)}")
    shift = (config["max_shift"] or training.default_shift(splits.sample_shape)) if "shift" in kind else 0
    return lambda x, generator: training.augment_images(x, generator, shift, "flip" in kind)


def build_job(ctx: Context, config: dict[str, Any]) -> Job:
    splits = load_splits(data_spec_from(config))
    spec = model_spec(config, splits)
    torch.manual_seed(config["seed"])  # identical initial weights on every rank
    model = build_from_spec(spec)
    apply_structure(model, spec.get("structure"))
    if spec["standardize"]:
        _standardize(model, splits)
    masks = None
    if config.get("init_from") and not config["resume"]:  # prune's fine-tuning starts from given weights
        model.load_state_dict(load_checkpoint(Path(config["init_from"]))["model"])
    if config.get("keep_zeros"):  # unstructured pruning: the zeros of the initial weights stay zero
        if config["resume"]:
            model.load_state_dict(load_checkpoint(RunFolder.at(config["run"]).checkpoint)["model"])
        masks = [(p, p.detach() != 0) for p in model.parameters() if p.dim() > 1]
    model.to(ctx.device)
    loader, sampler = _loader(splits.train, ctx, max(1, math.ceil(config["batch_size"] / ctx.world)), config["seed"])
    lr = config["lr"] or training.DEFAULT_LR[config["optimizer"]]
    optimizer = training.make_optimizer(model, config["optimizer"], lr, config["l2"], config["momentum"])
    schedule = training.make_schedule(optimizer, config["lr_schedule"], lr, config["epochs"], len(loader))
    run = RunFolder.at(config["run"])
    augment = augmentation(config, splits)
    job = Job(config, run, splits, spec, model, optimizer, schedule, loader, sampler, augment)
    job.distill, job.masks = _teacher(config, ctx), [(p, m.to(ctx.device)) for p, m in masks or []] or None
    return job


def _resume(job: Job, ctx: Context) -> tuple[int, EarlyStopping]:
    """Load the last checkpoint into the job (before DDP wraps the model); returns the next epoch."""
    state = load_checkpoint(job.run.checkpoint, map_location=str(ctx.device))
    job.model.load_state_dict(state["model"])
    job.optimizer.load_state_dict(state["optimizer"])
    job.schedule.load_state_dict(state["scheduler"])
    _restore_rng(ctx, state["rng"])
    if ctx.main:
        _truncate_metrics(job.run.metrics, state["epoch"])
        print(f"resuming {job.run.root} after epoch {state['epoch']}", flush=True)
    return state["epoch"] + 1, EarlyStopping(**state["early_stopping"])


def train_epoch(job: Job, ctx: Context, epoch: int) -> tuple[float, float]:
    """One pass over this rank's shard; returns job-wide mean loss and accuracy."""
    assert job.ddp is not None, "wrap the model in DDP first"
    config = job.config
    job.sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
    generator = torch.Generator().manual_seed(config["seed"] * 1_000_003 + epoch * 7919 + ctx.rank)
    job.ddp.train()
    totals = Totals()
    with _progress(ctx, config, len(job.loader), epoch) as bar:
        for xb, yb in job.loader:
            if job.augment is not None:
                xb = job.augment(xb, generator)
            xb, yb = xb.to(ctx.device, non_blocking=True), yb.to(ctx.device, non_blocking=True)
            with _autocast(ctx, config):
                logits = job.ddp(xb)
                if job.distill is not None:
                    loss = job.distill(logits.float(), yb, xb)
                else:
                    loss = F.cross_entropy(logits.float(), yb)
            objective = loss + config["l1"] * training.l1_penalty(job.model) if config["l1"] else loss
            job.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            job.optimizer.step()
            job.schedule.step()
            if job.masks is not None:
                with torch.no_grad():
                    for weight, keep in job.masks:
                        weight.mul_(keep)
            value = loss.item()
            totals.add(value * len(yb), (logits.argmax(1) == yb).sum().item(), len(yb))
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update()
    return totals.reduce(ctx)


def save_epoch(job: Job, ctx: Context, metrics: dict[str, Any], stopping: EarlyStopping, improved: bool) -> None:
    """Checkpoint (every epoch), best model (when improved) and a log line; rank 0 writes, all wait."""
    rng = _gather_rng(ctx)  # a collective: every rank takes part
    if ctx.main:
        common = {
            "epoch": metrics["epoch"],
            "model": job.model.state_dict(),
            "config": job.config,
            "model_spec": job.spec,
            "metrics": metrics,
        }
        if improved:
            save_checkpoint(common, job.run.best)
        save_checkpoint(
            {
                **common,
                "optimizer": job.optimizer.state_dict(),
                "scheduler": job.schedule.state_dict(),
                "rng": rng,
                "early_stopping": stopping.state(),
                "world_size": ctx.world,
            },
            job.run.checkpoint,
        )
        with open(job.run.metrics, "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")
        _print_epoch(metrics, job.config["epochs"], improved)
    dist.barrier()


def train(ctx: Context, config: dict[str, Any]) -> None:
    job = build_job(ctx, config)
    start, stopping = _resume(job, ctx) if config["resume"] else (1, EarlyStopping())
    job.ddp = DistributedDataParallel(job.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    epochs_this_run, stopped, began = 0, "completed", time.monotonic()
    for epoch in range(start, config["epochs"] + 1):
        tick = time.monotonic()
        train_loss, train_acc = train_epoch(job, ctx, epoch)
        val_loss, val_acc = evaluate(job.model, job.splits.val, ctx, config)
        improved = stopping.update(epoch, val_acc, val_loss)
        metrics = {
            "epoch": epoch,
            "train_loss": round(train_loss, 6),
            "train_accuracy": round(train_acc, 6),
            "val_loss": round(val_loss, 6),
            "val_accuracy": round(val_acc, 6),
            "lr": job.optimizer.param_groups[0]["lr"],
            "seconds": round(time.monotonic() - tick, 3),
            "world_size": ctx.world,
        }
        save_epoch(job, ctx, metrics, stopping, improved)
        epochs_this_run += 1
        if config["patience"] and stopping.bad_epochs >= config["patience"] and epoch < config["epochs"]:
            stopped = "early"  # only when epochs were left: a run that used them all "completed"
            break
        if config["stop_after_epochs"] and epochs_this_run >= config["stop_after_epochs"] and epoch < config["epochs"]:
            stopped = "interrupted"
            break
    if ctx.main:
        summary = {
            "stopped": stopped,
            "last_epoch": start + epochs_this_run - 1,
            "epochs_this_run": epochs_this_run,
            "seconds": round(time.monotonic() - began, 3),
            "world_size": ctx.world,
            **stopping.state(),
        }
        write_json(job.run.fit_summary, summary)


def _truncate_metrics(path: Path, last_epoch: int) -> None:
    """Drop log lines past the checkpoint, so a resumed run's log has each epoch once."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _print_epoch(m: dict[str, Any], epochs: int, improved: bool) -> None:
    from tqdm import tqdm

    tqdm.write(
        f"epoch {m['epoch']:>3}/{epochs}  loss {m['train_loss']:.4f}  acc {m['train_accuracy']:.4f}  "
        f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  lr {m['lr']:.2e}  "
        f"{m['seconds']:.1f}s{'  *' if improved else ''}",
        file=sys.stdout,
    )
    sys.stdout.flush()


def main() -> int:
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    _die_with_launcher()
    handler = get_error_handler()
    handler.initialize()
    try:
        ctx, config = _setup()
    except TrainerError as err:
        handler.record_exception(err)
        print(f"tensorwire fit: error: {err}", file=sys.stderr)
        return 2
    try:
        train(ctx, config)
    except TrainerError as err:
        handler.record_exception(err)
        print(f"tensorwire fit: error (rank {ctx.rank}): {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        handler.record_exception(err)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every file is closed (and renamed into place) by now. Skipping the interpreter's
    # teardown of torch saves ~2 s per run on a busy 2-core machine.
    os._exit(code)
