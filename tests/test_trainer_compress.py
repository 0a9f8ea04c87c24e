"""``tensorwire prune`` and ``tensorwire distill`` for real: a digits CNN trained with 2-process DDP,
then pruned (structured and unstructured) and distilled, each fine-tuned/trained with 2-process DDP
through the same launcher as ``fit``; the results go through export, quantize and publish unchanged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_runs import digits_cnn, run_cli, run_cli_ok

from tensorwire.repository import load_model_config
from tensorwire.trainer.artifacts import accuracy, load_trained, onnx_session, predict_onnx, splits_of
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint
from tensorwire.trainer.structure import count_nonzero, count_parameters

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> RunFolder:
    """A digits CNN (width 16) trained with 2 DDP processes: the model to compress."""
    run = tmp_path_factory.mktemp("compress") / "parent"
    run_cli_ok("fit", *digits_cnn(16), "--epochs", "6", "--run", str(run), "--no-progress")
    return RunFolder.at(run)


def prune(parent: RunFolder, run: Path, *args: str) -> subprocess.CompletedProcess:
    """``tensorwire prune`` of ``parent`` into ``run`` with ``args``; 2 fine-tuning epochs, 2 DDP processes."""
    common = ["--finetune-epochs", "2", "--nproc-per-node", "2", "--no-progress"]
    return run_cli_ok("prune", "--source", str(parent.root), "--run", str(run), *args, *common)


@pytest.fixture(scope="module")
def pruned(parent) -> tuple[RunFolder, subprocess.CompletedProcess]:
    run = parent.root.parent / "pruned"
    result = prune(parent, run, "--keep", "0.4", "--steps", "2")
    return RunFolder.at(run), result


def test_structured_pruning_really_shrinks_the_layers(parent, pruned):
    run, result = pruned
    report = json.loads((run.root / "prune_report.json").read_text())
    parent_model, _ = load_trained(parent.best)
    model, state = load_trained(run.best)
    assert count_parameters(model) == report["params"] < 0.45 * count_parameters(parent_model)
    assert report["flops"] < report["parent_flops"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][0]["params"] > report["rounds"][1]["params"]  # iterative: each round removes more
    # Whole channels went: the convolutions are narrower, not just sparser.
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    parent_widths = [m.out_channels for m in parent_model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(widths) < sum(parent_widths) and count_nonzero(model) == count_parameters(model)
    assert state["config"]["nproc_per_node"] == 2
    metrics = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert metrics and all(m["world_size"] == 2 for m in metrics)  # fine-tuned with 2 DDP processes
    assert report["val_accuracy"] >= 0.85, result.stdout
    assert "prune: structured: kept" in result.stdout


def test_a_pruned_run_exports_quantizes_and_publishes_unchanged(pruned, tmp_path):
    from tensorwire.trainer.config import ExportOptions, PublishOptions, QuantizeOptions
    from tensorwire.trainer.export import export
    from tensorwire.trainer.publish import publish
    from tensorwire.trainer.quantize import quantize

    run, _ = pruned
    repo = tmp_path / "models"
    report = export(ExportOptions(run=str(run.root), formats=["onnx", "pt2"]))
    quantize(QuantizeOptions(run=str(run.root)))
    publish(PublishOptions(run=str(run.root), repo=str(repo), force=True), fmt="int8", name="p_int8")
    publish(PublishOptions(run=str(run.root), repo=str(repo)), fmt="pt2", name="p_pt2")
    assert max(report["onnx"]["max_abs_diff"].values()) < 1e-4 and max(report["pt2"]["max_abs_diff"].values()) < 1e-4
    _, state = load_trained(run.best)
    test = splits_of(state).test
    session = onnx_session(repo / "p_int8" / "1" / "model.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in onnx.load(str(run.int8)).graph.node}
    assert accuracy(predict_onnx(session, test.x), test.y) == pytest.approx(
        float(load_model_config(repo / "p_int8").metadata["accuracy"]), abs=1e-4
    )
    assert load_model_config(repo / "p_pt2").backend == "torch_export"
    # without --name, a derived run is named after its run folder: never the parent's digits_cnn
    unnamed = publish(PublishOptions(run=str(run.root), repo=str(repo)), fmt="onnx")
    assert unnamed["name"] == run.root.name == "pruned" and not (repo / "digits_cnn").exists()
    source = load_model_config(repo / "pruned").metadata["source_checkpoint"]
    assert source == "pruned/best.pt"  # no host path in the config a client can read


def test_prune_warns_when_accuracy_fell_more_than_a_point(pruned):
    from tensorwire.trainer.prune import accuracy_warning

    run, result = pruned
    report = json.loads((run.root / "prune_report.json").read_text())
    drop = 100 * (report["parent_val_accuracy"] - report["val_accuracy"])
    assert ("prune: warning: the pruned model's val_accuracy is" in result.stderr) == (drop > 1.0), result.stderr
    lower = accuracy_warning({**report, "val_accuracy": report["parent_val_accuracy"] - 0.05})
    assert lower is not None and "5.0 points below" in lower
    assert "--finetune-epochs" in lower and "--lr" in lower and "--keep" in lower
    assert accuracy_warning({**report, "val_accuracy": report["parent_val_accuracy"] - 0.005}) is None


def test_unstructured_pruning_zeroes_weights_and_keeps_them_zero(parent, tmp_path):
    run = RunFolder.at(tmp_path / "sparse")
    result = prune(parent, run.root, "--method", "unstructured", "--keep", "0.3", "--steps", "1")
    report = json.loads((run.root / "prune_report.json").read_text())
    model, _ = load_trained(run.best)
    parent_model, _ = load_trained(parent.best)
    assert count_parameters(model) == count_parameters(parent_model)  # same tensors: no speed-up on dense kernels
    weights = [p for p in model.parameters() if p.dim() > 1]
    zero_fraction = sum(int((p == 0).sum()) for p in weights) / sum(p.numel() for p in weights)
    assert zero_fraction == pytest.approx(0.7, abs=0.02)  # after fine-tuning, the zeros are still zeros
    assert report["nonzero_params"] < 0.4 * report["parent_nonzero_params"]
    assert "file size and CPU speed stay" in result.stderr


def test_distillation_trains_a_smaller_student_with_ddp_and_resumes(parent, tmp_path):
    run = RunFolder.at(tmp_path / "student")
    common = ("--run", str(run.root), "--nproc-per-node", "2", "--no-progress")
    first = run_cli(
        "distill",
        "--teacher",
        str(parent.root),
        "--model",
        "cnn",
        "--model-arg",
        "width=4",
        "--epochs",
        "6",
        "--temperature",
        "3",
        "--alpha",
        "0.8",
        "--stop-after-epochs",
        "3",
        *common,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads(run.fit_summary.read_text())["stopped"] == "interrupted"
    second = run_cli("distill", "--resume", *common)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming" in second.stdout and "(teacher" not in second.stdout
    summary = json.loads(run.fit_summary.read_text())
    assert summary["stopped"] == "completed" and summary["last_epoch"] == 6 and summary["world_size"] == 2
    checkpoint = load_checkpoint(run.checkpoint)
    assert checkpoint["config"]["distill"] == {
        "teacher": str(parent.best.resolve()),
        "temperature": 3.0,
        "alpha": 0.8,
    }
    assert checkpoint["config"]["seed"] == load_checkpoint(parent.best)["config"]["seed"]  # the teacher's split
    student, state = load_trained(run.best)
    teacher, _ = load_trained(parent.best)
    assert count_parameters(student) < count_parameters(teacher) / 10
    test = splits_of(state).test
    logits = student(torch.from_numpy(test.x)).detach().numpy()
    assert accuracy(logits, test.y) >= 0.6 and np.isfinite(logits).all()


def test_distill_refuses_a_data_split_other_than_the_teachers(parent, tmp_path, capsys):
    from tensorwire.trainer import cli

    code = cli.distill(["--teacher", str(parent.root), "--run", str(tmp_path / "s"), "--seed", "7"])
    assert code == 2
    assert "--seed differs from the teacher's" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prune", "distill", "export"])
def test_help_describes_the_new_commands(command):
    result = run_cli(command, "--help", timeout=60)
    assert result.returncode == 0
    assert "example: tensorwire" in result.stdout
    if command == "prune":
        assert "--keep" in result.stdout and "--method" in result.stdout and "--nproc-per-node" in result.stdout
    if command == "distill":
        assert "--teacher" in result.stdout and "--temperature" in result.stdout and "--alpha" in result.stdout
    if command == "export":
        assert "pt2" in result.stdout and "aoti" in result.stdout
