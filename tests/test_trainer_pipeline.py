"""The whole trainer on real data: ``tensorwire train`` (2-process DDP on digits) -> export ->
INT8 -> publish, run once as a real subprocess; each test checks one promise of the result.

The run is build-default-repo's recipe (CNN width 16, 10 epochs, seed 0, default INT8 options), so
its accuracies are the ones measured across instruction sets with ``tests/isa_matrix.py`` (see the
README, "What varies across machines", and tests/test_trainer_e2e.py): best val accuracy 0.9851-0.9963
over seeds 0-5 trained with AVX-512, AVX2 and SSE kernels (asserted >= 0.95), FP32 test accuracy
0.9740-1.0000 (>= 0.95), INT8 drop at most 0.74 points, the same on every ONNX Runtime CPU measured
(<= 1 point, the publish gate; seed 0: at most 0.00).
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from cli_runs import digits_cnn, run_cli

from tensorwire.repository import (
    DynamicBatching,
    InstanceGroup,
    VersionPolicy,
    available_versions,
    list_models,
    load_model_config,
    write_model_config,
)
from tensorwire.trainer import cli
from tensorwire.trainer.artifacts import (
    accuracy,
    load_trained,
    onnx_session,
    predict_onnx,
    predict_torch,
    splits_of,
)
from tensorwire.trainer.config import PublishOptions
from tensorwire.trainer.publish import publish
from tensorwire.trainer.runfolder import RunFolder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RunFolder, Path, str]:
    root = tmp_path_factory.mktemp("pipeline")
    run, repo = root / "run", root / "models"
    result = run_cli(
        "train",
        *digits_cnn(16),
        "--epochs",
        "10",
        "--patience",
        "4",
        "--run",
        str(run),
        "--repo",
        str(repo),
        "--name",
        "digits_cnn",
        "--no-progress",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return RunFolder.at(run), repo, result.stdout


def test_two_process_ddp_reaches_95_percent(trained):
    run, _, stdout = trained
    summary = json.loads(run.fit_summary.read_text())
    assert summary["world_size"] == 2
    assert summary["best_val_accuracy"] >= 0.95, stdout
    assert "fit: " in stdout and "publish: digits_cnn_int8 version 1" in stdout


def test_metrics_log_has_one_line_per_epoch(trained):
    run, _, _ = trained
    lines = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(1, len(lines) + 1))
    for m in lines:
        assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= m.keys()
        assert m["world_size"] == 2
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_checkpoint_is_complete_and_loads_weights_only(trained):
    run, _, _ = trained
    state = torch.load(run.checkpoint, weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "config", "early_stopping"} <= state.keys()
    assert isinstance(state["torch_version"], str)
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert state["config"]["nproc_per_node"] == 2 and state["config"]["model"] == "cnn"
    best = torch.load(run.best, weights_only=True)
    assert best["metrics"]["val_accuracy"] == pytest.approx(
        json.loads(run.fit_summary.read_text())["best_val_accuracy"], abs=1e-6
    )


def test_export_parity_for_the_cnn_at_several_batch_sizes(trained):
    run, _, _ = trained
    report = json.loads(run.export_report.read_text())
    for fmt in ("onnx", "torchscript"):
        assert set(report[fmt]["max_abs_diff"]) == {"1", "7", "64"}
        assert max(report[fmt]["max_abs_diff"].values()) < 1e-4
    model = onnx.load(str(run.onnx))
    assert [i.name for i in model.graph.input] == ["INPUT0"] and [o.name for o in model.graph.output] == ["OUTPUT0"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    assert not list(run.export_dir.glob("*.data"))  # one self-contained file


def test_int8_accuracy_within_one_point_of_fp32(trained):
    run, _, stdout = trained
    report = json.loads(run.quantize_report.read_text())
    assert report["mode"] == "static" and report["per_channel"]
    assert report["accuracy_drop_points"] <= 1.0, report
    assert report["fp32_accuracy"] >= 0.95
    ops = {node.op_type for node in onnx.load(str(run.int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert report["int8_bytes"] < report["fp32_bytes"]


def test_published_repository_matches_design_layout(trained):
    run, repo, _ = trained
    assert list_models(repo) == ["digits_cnn", "digits_cnn_int8", "digits_cnn_ts"]
    files = {"digits_cnn": "model.onnx", "digits_cnn_int8": "model.onnx", "digits_cnn_ts": "model.pt"}
    state = load_trained(run.best)[1]
    test = splits_of(state).test
    for name, filename in files.items():
        config = load_model_config(repo / name)
        assert available_versions(repo / name) == [1]
        assert (repo / name / "1" / filename).is_file()
        assert config.backend == ("torchscript" if filename == "model.pt" else "onnxruntime")
        assert config.max_batch_size == 64
        assert [(s.name, s.datatype, s.dims) for s in config.inputs] == [("INPUT0", "FP32", [1, 8, 8])]
        assert [(s.name, s.datatype, s.dims) for s in config.outputs] == [("OUTPUT0", "FP32", [10])]
        assert config.batching and config.dynamic_batching.preferred_batch_sizes == [16, 32]
        if filename == "model.pt":
            logits = predict_torch(torch.jit.load(str(repo / name / "1" / filename)), test.x)
        else:
            logits = predict_onnx(onnx_session(repo / name / "1" / filename), test.x)
        assert config.metadata["accuracy"] == f"{accuracy(logits, test.y):.4f}"  # the artifact's own accuracy
        assert config.metadata["dataset"] == "digits"
    int8 = load_model_config(repo / "digits_cnn_int8").metadata
    assert float(int8["accuracy_drop_points"]) <= 1.0 and "fp32_accuracy" in int8


def test_publish_takes_the_next_version_atomically(trained, tmp_path):
    run, repo, _ = trained
    repo_copy = tmp_path / "models"
    shutil.copytree(repo, repo_copy)
    options = PublishOptions(run=str(run.root), repo=str(repo_copy))
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(publish(options, fmt="onnx", name="digits_cnn")["version"]))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [2, 3, 4, 5]  # concurrent publishers never share a number
    assert [p.name for p in (repo_copy / "digits_cnn").iterdir() if p.name.startswith(".tmp")] == []
    assert available_versions(repo_copy / "digits_cnn") == [1, 2, 3, 4, 5]
    assert (
        cli.publish(
            [
                "--run",
                str(run.root),
                "--repo",
                str(repo_copy),
                "--format",
                "torchscript",
                "--name",
                "digits_cnn_ts",
                "--version",
                "1",
            ]
        )
        == 2
    )  # an explicit, taken version


def test_publishing_again_keeps_the_serving_settings_and_writes_no_host_path(trained, tmp_path, capsys):
    """A new version of an existing model keeps what its owner set in config.toml (max_batch_size, batching,
    instances, version policy, their own metadata) and says so; the signature and metadata are the new ones."""
    run, repo, _ = trained
    repo_copy = tmp_path / "models"
    shutil.copytree(repo, repo_copy)
    model_dir = repo_copy / "digits_cnn"
    config = load_model_config(model_dir)
    tuned = {
        "max_batch_size": 32,
        "dynamic_batching": DynamicBatching(max_queue_delay_us=200, preferred_batch_sizes=[8]),
        "instance_group": [InstanceGroup(kind="cpu", count=2)],
        "version_policy": VersionPolicy(all=True),
        "metadata": {**config.metadata, "owner": "team-a"},
    }
    write_model_config(config.model_copy(update=tuned), model_dir)
    assert cli.publish(["--run", str(run.root), "--repo", str(repo_copy), "--name", "digits_cnn"]) == 0
    out = capsys.readouterr().out
    assert "kept the serving settings of the existing" in out and "max_batch_size 32" in out
    after = load_model_config(model_dir)
    assert available_versions(model_dir) == [1, 2]
    assert after.max_batch_size == 32 and after.dynamic_batching == tuned["dynamic_batching"]
    assert after.instance_group == tuned["instance_group"] and after.version_policy == VersionPolicy(all=True)
    assert after.metadata["owner"] == "team-a" and after.metadata["published_at"] >= config.metadata["published_at"]
    # an option given on the command line replaces its setting; the others stay
    repeat = ["--run", str(run.root), "--repo", str(repo_copy), "--name", "digits_cnn", "--max-batch-size", "16"]
    assert cli.publish(repeat) == 0
    again = load_model_config(model_dir)
    assert again.max_batch_size == 16 and again.instance_group == tuned["instance_group"]
    source = after.metadata["source_checkpoint"]
    assert (
        source == f"{run.root.name}/best.pt" and str(run.root.resolve()) not in (model_dir / "config.toml").read_text()
    )


def test_publish_refuses_an_int8_model_that_lost_too_much(trained, tmp_path, capsys):
    run, _, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    report_path = RunFolder.at(copy).quantize_report
    report = json.loads(report_path.read_text())
    report.update(accuracy_drop_points=3.5, int8_accuracy=report["fp32_accuracy"] - 0.035)
    report_path.write_text(json.dumps(report))
    repo = tmp_path / "models"
    assert cli.publish(["--run", str(copy), "--repo", str(repo), "--format", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorwire publish: error: INT8 accuracy dropped 3.50 points") and err.count("\n") == 1
    assert "--force" in err and not (repo / "digits_cnn_int8").exists()
    assert cli.publish(["--run", str(copy), "--repo", str(repo), "--format", "int8", "--force"]) == 0
    assert available_versions(repo / "digits_cnn_int8") == [1]


def test_published_torchscript_runs_any_batch_size(trained):
    _, repo, _ = trained
    model = torch.jit.load(str(repo / "digits_cnn_ts" / "1" / "model.pt"))
    for batch in (1, 5, 64):
        assert tuple(model(torch.rand(batch, 1, 8, 8)).shape) == (batch, 10)
    assert np.isfinite(model(torch.rand(3, 1, 8, 8)).detach().numpy()).all()
