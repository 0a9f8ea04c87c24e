"""How ``fit`` drives PyTorch's elastic launcher: standalone on one machine, and several
machines through a shared rendezvous (simulated here by two launchers on one machine)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tensorwire.trainer import cli
from tensorwire.trainer.config import FitOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.launch import launch_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_machine_uses_a_standalone_rendezvous():
    config = launch_config(FitOptions(nproc_per_node=2, timeout=30))
    assert (config.rdzv_backend, config.rdzv_endpoint, config.nproc_per_node) == ("c10d", "localhost:0", 2)
    assert config.max_restarts == 0 and config.rdzv_configs["timeout"] == 30
    assert launch_config(FitOptions()).run_id != config.run_id  # a fresh job id each time


def test_several_machines_share_an_endpoint_and_job_id():
    config = launch_config(FitOptions(nnodes="2:4", rdzv_endpoint="head:29400", rdzv_id="job7"))
    assert (config.min_nodes, config.max_nodes, config.rdzv_backend) == (2, 4, "c10d")
    assert (config.rdzv_endpoint, config.run_id) == ("head:29400", "job7")
    static = launch_config(FitOptions(nnodes="2", rdzv_endpoint="head:29400", node_rank=1))
    assert static.rdzv_backend == "static" and static.rdzv_configs["rank"] == 1


@pytest.mark.parametrize("nnodes", ["0", "3:2", "two"])
def test_bad_node_counts(nnodes):
    with pytest.raises(TrainerError, match="--nnodes"):
        launch_config(FitOptions(nnodes=nnodes))


def test_train_checks_the_model_name_before_training(tmp_path, capsys):
    assert cli.train(["--name", "../escape", "--run", str(tmp_path / "r")]) == 2
    assert "invalid model name" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_two_machines_with_a_static_rendezvous(tmp_path):
    """Node 0 and node 1, each its own launcher and run folder (no shared filesystem)."""
    port = free_port()
    common = [
        "--data",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "2",
        "--nnodes",
        "2",
        "--nproc-per-node",
        "1",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--timeout",
        "60",
        "--no-progress",
    ]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorwire.cli",
                "fit",
                *common,
                "--node-rank",
                str(rank),
                "--run",
                str(tmp_path / f"node{rank}"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    metrics = [json.loads(line) for line in (tmp_path / "node0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["world_size"] for m in metrics] == [2, 2]
    assert not (tmp_path / "node1" / "checkpoint.pt").exists()  # only global rank 0 writes
    assert "the machine running rank 0 holds the checkpoints" in outputs[1]
