"""Training on CPU is reproducible for a seed on one machine, and only there.

Same seed, same machine, same number of processes: the same weights, bit for bit (seeded
initialization, shuffling and augmentation; one thread per rank; gloo's all-reduce adds the two
ranks' gradients in a fixed order). Another instruction set gives other weights: PyTorch's kernels
(ATen, oneDNN's convolutions, MKL) sum in another order on AVX-512, AVX2 or SSE, so the rounding
differs. Real 2-process DDP runs, each in its own interpreter with a timeout.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import digits_cnn, run_cli_ok

pytestmark = pytest.mark.slow

#: The default CNN with random-shift augmentation, shortened to 2 epochs.
CNN = [
    *digits_cnn(8),
    "--epochs",
    "2",
    "--seed",
    "3",
    "--no-progress",
]

#: Kernel libraries forced to their SSE code paths (what a CPU without AVX would run).
BASELINE_ISA = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


def fit(run: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_cli_ok("fit", "--run", str(run), *args, timeout=240, env=env)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def metrics(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "seconds"} for m in lines]


@pytest.fixture(scope="module")
def twice(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("repro")
    fit(root / "a", *CNN)
    fit(root / "b", *CNN)
    return root / "a", root / "b"


def test_same_seed_same_machine_same_weights(twice):
    a, b = twice
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert metrics(a) == metrics(b)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() == "DEFAULT",
    reason="this CPU already runs PyTorch's baseline kernels: there is no other instruction set to compare",
)
def test_another_instruction_set_gives_other_weights(twice, tmp_path):
    """Why accuracies move between machines: the same run on SSE kernels ends elsewhere."""
    a, _ = twice
    fit(tmp_path / "sse", *CNN, env=BASELINE_ISA)
    wa, ws = weights(a), weights(tmp_path / "sse")
    assert any(not torch.equal(wa[name], ws[name]) for name in wa if wa[name].is_floating_point())


def test_a_run_that_used_all_its_epochs_completed(tmp_path):
    """Patience running out on the last epoch is not an early stop. A learning rate of 1e-30 leaves
    every weight unchanged (far below float32's resolution), so epoch 2 cannot improve on epoch 1."""
    frozen = ["--data", "digits", "--model", "mlp", "--model-arg", "hidden=[16]", "--optimizer", "sgd"]
    frozen += ["--momentum", "0", "--lr", "1e-30", "--lr-schedule", "constant", "--patience", "1", "--no-progress"]
    done = fit(tmp_path / "all", *frozen, "--epochs", "2")
    assert "fit: completed after epoch 2" in done.stdout, done.stdout
    assert json.loads((tmp_path / "all" / "fit_summary.json").read_text())["stopped"] == "completed"
    early = fit(tmp_path / "early", *frozen, "--epochs", "3")
    assert "fit: early after epoch 2" in early.stdout, early.stdout
