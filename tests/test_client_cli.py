"""``tensorwire health | metadata | infer`` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from client_models import identity_name, small_repo
from model_factory import onnx_add_sub, onnx_identity
from serving import free_port, running_server

from tensorwire.cli import main as tensorwire_main


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = small_repo(tmp_path_factory.mktemp("cli") / "models")
    onnx_identity(repo, identity_name("BYTES"), datatype="BYTES", dims=[3], max_batch_size=4, warmup="none")
    onnx_add_sub(repo, "add_sub", max_batch_size=4, warmup="none")
    with running_server(repo, "--drain-seconds", "0") as running:
        yield running


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = tensorwire_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_health(server, capsys):
    code, out, _ = run(capsys, "health", "-a", server.address, "--model", "identity")
    assert code == 0 and "live=yes ready=yes" in out and "model identity: ready=yes" in out
    code, out, _ = run(capsys, "health", "-a", server.address, "--model", "nope", "--json")
    report = json.loads(out)
    assert code == 1 and report["live"] and report["models"] == {"nope": False}  # Triton's answer: not ready
    code, out, _ = run(capsys, "health", "-a", server.address, "--model", "identity", "--version", "-1", "--json")
    report = json.loads(out)
    assert code == 1 and "not a version number" in report["errors"]["identity"]
    code, _, err = run(capsys, "health", "-a", f"127.0.0.1:{free_port()}", "--retries", "1", "--timeout", "2")
    assert code == 2 and "UNAVAILABLE" in err


def test_metadata(server, capsys):
    code, out, _ = run(capsys, "metadata", "-a", server.address, "--index")
    document = json.loads(out)
    assert code == 0 and document["server"]["name"] == "tensorwire"
    assert "identity" in {m["name"] for m in document["models"]}
    code, out, _ = run(capsys, "metadata", "-a", server.address, "-m", "identity", "--config", "--stats")
    document = json.loads(out)
    assert document["metadata"]["inputs"][0] == {"name": "INPUT0", "datatype": "FP32", "shape": [-1, 16]}
    assert document["config"]["max_batch_size"] == 8 and "model_stats" in document["statistics"]
    assert document["config"]["input"][0]["dims"] == [16]  # 64-bit integers are JSON numbers, at any depth
    code, _, err = run(capsys, "metadata", "-a", server.address, "-m", "nope")
    assert code == 1 and "NOT_FOUND" in err


def test_infer_npy_to_npz(server, capsys, tmp_path):
    # float64 and no batch dimension: the CLI conforms them to the model's metadata.
    np.save(tmp_path / "x.npy", np.arange(16, dtype=np.float64))
    code, _, err = run(
        capsys,
        "infer",
        "-a",
        server.address,
        "-m",
        "identity",
        f"INPUT0={tmp_path / 'x.npy'}",
        "-o",
        str(tmp_path / "out.npz"),
    )
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as out:
        assert out["OUTPUT0"].dtype == np.float32 and np.array_equal(out["OUTPUT0"], [np.arange(16)])


def test_infer_json_and_npz_inputs(server, capsys, tmp_path):
    (tmp_path / "in.json").write_text(json.dumps({"INPUT0": [[1] * 16], "INPUT1": [[2] * 16]}))
    code, out, _ = run(
        capsys,
        "infer",
        "-a",
        server.address,
        "-m",
        "add_sub",
        str(tmp_path / "in.json"),
        "--outputs",
        "OUTPUT1",
        "--id",
        "cli-1",
    )
    document = json.loads(out)
    assert code == 0 and document["id"] == "cli-1" and list(document["outputs"]) == ["OUTPUT1"]
    assert document["outputs"]["OUTPUT1"] == {"datatype": "FP32", "shape": [1, 16], "data": [-1.0] * 16}
    np.savez(tmp_path / "words.npz", INPUT0=np.array([["a", "b", "ç"]]))
    code, _, _ = run(
        capsys,
        "infer",
        "-a",
        server.address,
        "-m",
        identity_name("BYTES"),
        str(tmp_path / "words.npz"),
        "-o",
        str(tmp_path / "words.json"),
    )
    assert code == 0
    words = json.loads((tmp_path / "words.json").read_text())["outputs"]["OUTPUT0"]
    assert words == {"datatype": "BYTES", "shape": [1, 3], "data": ["a", "b", "ç"]}
    code, _, err = run(capsys, "infer", "-a", server.address, "-m", "identity", str(tmp_path / "missing.npy"))
    assert code == 2 and "missing.npy" in err


def test_console_entry_point(server):
    out = subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", "health", "-a", server.address, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ready"] is True
