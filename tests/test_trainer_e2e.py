"""Publish -> serve -> infer: the default repository, built by the trainer, served by tensorwire.

The accuracy computed from tensorwire's gRPC answers over the held-out digits must equal the
offline accuracy of the very same artifact (ONNX Runtime or TorchScript in this process), and
the accuracy the trainer wrote into ``[metadata]``. Skipped when the server is not installed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import decode_raw, encode_raw
from tensorwire.repository import load_model_config
from tensorwire.trainer.artifacts import (
    accuracy,
    load_trained,
    onnx_session,
    predict_onnx,
    predict_torch,
    splits_of,
)
from tensorwire.trainer.default_repo import MODELS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("tensorwire.server.cli") is None, reason="the server is not built yet"
    ),
]

from serving import call, running_server  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("e2e")
    repo, work = root / "models", root / "work"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorwire.cli",
            "build-default-repo",
            "--repo",
            str(repo),
            "--workdir",
            str(work),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return repo, work / "digits_cnn"


def infer(channel, model: str, x: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits for all of ``x`` from the server, ``batch`` samples per ModelInfer call."""
    outputs = []
    for start in range(0, len(x), batch):
        datatype, shape, raw = encode_raw(x[start : start + batch])
        request = pb.ModelInferRequest(
            model_name=model,
            id=f"{model}-{start}",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype=datatype, shape=shape)],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="OUTPUT0")],
            raw_input_contents=[raw],
        )
        response = call(channel, "ModelInfer", request, timeout=30)
        (tensor,) = response.outputs
        assert tensor.name == "OUTPUT0" and tensor.datatype == "FP32" and response.id == f"{model}-{start}"
        outputs.append(decode_raw(response.raw_output_contents[0], tensor.datatype, list(tensor.shape)))
    return np.concatenate(outputs)


def offline_logits(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    config = load_model_config(repo / model)
    path = repo / model / "1" / config.model_filename
    if config.backend == "torchscript":
        return predict_torch(torch.jit.load(str(path)), x)
    return predict_onnx(onnx_session(path), x)


def test_served_accuracy_equals_offline_accuracy_of_the_same_artifact(default_repo):
    repo, run = default_repo
    test = splits_of(load_trained(run / "best.pt")[1]).test
    served_accuracy: dict[str, float] = {}
    with running_server(repo) as server, server.channel() as channel:
        for model in MODELS:
            assert call(channel, "ModelReady", pb.ModelReadyRequest(name=model)).ready, server.log()
            served = infer(channel, model, test.x)
            offline = offline_logits(repo, model, test.x)
            assert served.shape == offline.shape == (len(test), 10)
            np.testing.assert_allclose(served, offline, atol=1e-4, err_msg=model)
            assert accuracy(served, test.y) == accuracy(offline, test.y), model
            published = load_model_config(repo / model).metadata["accuracy"]
            assert f"{accuracy(served, test.y):.4f}" == published, model
            config = call(channel, "ModelConfig", pb.ModelConfigRequest(name=model)).config
            assert config.parameters["accuracy"].string_value == published
            assert config.max_batch_size == 64
            served_accuracy[model] = accuracy(served, test.y)
        assert (
            accuracy(infer(channel, "digits_cnn", test.x, batch=1), test.y) == served_accuracy["digits_cnn"]
        )
    assert served_accuracy["digits_cnn"] >= 0.95
    assert served_accuracy["digits_cnn"] - served_accuracy["digits_cnn_int8"] <= 0.01  # INT8 within 1 point


def test_build_default_repo_is_a_no_op_the_second_time(default_repo):
    repo, _ = default_repo
    command = [sys.executable, "-m", "tensorwire.cli", "build-default-repo", "--repo", str(repo)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    visible = sorted(p.name for p in (repo / "digits_cnn").iterdir() if not p.name.startswith("."))
    assert visible == ["1", "config.toml"]
