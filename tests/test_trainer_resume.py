"""``tensorwire fit --resume``: a run stopped mid-way continues from its saved epoch.

Real 2-process DDP runs, each in its own interpreter with a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runs import digits_cnn, run_cli_ok

from tensorwire.trainer import cli

pytestmark = pytest.mark.slow

SMALL = [
    "--data",
    "digits",
    "--model",
    "mlp",
    "--model-arg",
    "hidden=[64]",
    "--augment",
    "none",
    "--nproc-per-node",
    "2",
    "--epochs",
    "4",
    "--patience",
    "0",
    "--no-progress",
]


def fit(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return run_cli_ok("fit", *args, timeout=timeout)


def epochs_logged(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def interrupted_and_resumed(tmp_path_factory) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("resume")
    whole, pieces = root / "whole", root / "pieces"
    fit(*SMALL, "--run", str(whole))
    fit(*SMALL, "--run", str(pieces), "--stop-after-epochs", "2")
    assert torch.load(pieces / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((pieces / "fit_summary.json").read_text())["stopped"] == "interrupted"
    resumed = fit("--run", str(pieces), "--resume", "--no-progress")
    return whole, pieces, resumed.stdout


def test_resume_continues_from_the_saved_epoch(interrupted_and_resumed):
    _, pieces, stdout = interrupted_and_resumed
    assert "resuming" in stdout and "after epoch 2" in stdout
    assert "epoch   1/4" not in stdout and "epoch   3/4" in stdout
    assert epochs_logged(pieces) == [1, 2, 3, 4]
    summary = json.loads((pieces / "fit_summary.json").read_text())
    assert summary["stopped"] == "completed" and summary["epochs_this_run"] == 2


def test_resumed_run_equals_an_uninterrupted_one(interrupted_and_resumed):
    """Model, optimizer, schedule and every rank's RNG come back: the result is the same run."""
    whole, pieces, _ = interrupted_and_resumed
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(pieces / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for key, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][key], tensor, rtol=0, atol=1e-6)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


@pytest.mark.parametrize(("flag", "value"), [("--model", "cnn"), ("--epochs", "8"), ("--lr", "0.1")])
def test_resume_refuses_different_training_options(interrupted_and_resumed, flag, value, capsys):
    _, pieces, _ = interrupted_and_resumed
    assert cli.fit(["--run", str(pieces), "--resume", flag, value]) == 2
    assert f"cannot resume {pieces} with a different {flag}" in capsys.readouterr().err


def test_fresh_fit_refuses_to_overwrite_a_checkpoint(interrupted_and_resumed, capsys):
    _, pieces, _ = interrupted_and_resumed
    assert cli.fit([*SMALL, "--run", str(pieces)]) == 2
    err = capsys.readouterr().err
    assert "already holds a checkpoint" in err and "--resume" in err and err.count("\n") == 1


def test_resume_after_the_job_was_killed(tmp_path):
    """SIGKILL the launcher mid-training: its workers die too, and the last checkpoint resumes."""
    run = tmp_path / "run"
    epochs = 6
    args = [
        *digits_cnn(8),
        "--epochs",
        str(epochs),
        "--patience",
        "0",
        "--no-progress",
        "--run",
        str(run),
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "tensorwire.cli", "fit", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if (run / "metrics.jsonl").exists() and len(epochs_logged(run)) >= 2:
                break
            time.sleep(0.02)
    finally:
        # The launcher only: torch starts workers in sessions of their own, and they must die with it.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    time.sleep(2)  # orphaned workers would keep training and checkpointing
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == saved
    if saved >= epochs:
        pytest.skip("the run finished before it could be killed (machine too fast for this check)")
    result = fit("--run", str(run), "--resume", "--no-progress")
    assert f"after epoch {saved}" in result.stdout
    assert epochs_logged(run) == list(range(1, epochs + 1))
