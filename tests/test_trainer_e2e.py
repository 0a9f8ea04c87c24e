"""Publish -> serve -> infer: the default repository, built by the trainer, served by tensorwire.

The accuracy computed from tensorwire's gRPC answers over the held-out digits must equal the
offline accuracy of the very same artifact (ONNX Runtime or TorchScript in this process), and
the accuracy the trainer wrote into ``[metadata]``. Skipped when the server is not installed.

Margins. Trained weights, and so accuracies, depend on the CPU's instruction set (PyTorch picks
its kernels by CPU; each sums in another order). The thresholds below hold with margin on every
setting measured with ``tests/isa_matrix.py`` (seed 0 = the default recipe; seeds 1-5 as a
proxy for weights nobody has measured yet), training under ATen/oneDNN/MKL forced to AVX-512,
AVX2 and SSE (the AVX2 setting reproduces an AVX2-only machine's weights bit for bit), and
serving with ONNX Runtime on AVX-512 VNNI, AVX2 (qemu -cpu Haswell) and SSE4.2 (qemu -cpu Nehalem):

* FP32 test accuracy, seed 0: 0.9777-0.9814; seeds 0-5: 0.9740-1.0000  -> asserted >= 0.95.
* INT8 (7-bit weights) drop below FP32, seed 0: -0.37..0.00 points; seeds 0-5: at most 0.74 points
  (2 of 269 test samples), identical on all three ONNX Runtime CPUs  -> asserted <= 1 point (the gate).
  With 8-bit weights the same models lost up to 3.0 points on AVX2 kernels only (0.9926 -> 0.9628):
  test_int8_answers_do_not_depend_on_the_serving_cpu checks that this cannot come back.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
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
    pytest.mark.skipif(importlib.util.find_spec("tensorwire.server.cli") is None, reason="the server is not built yet"),
]

from serving import call, running_server  # noqa: E402  (tests/ is on sys.path under pytest)


def build_default_repo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", "build-default-repo", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def default_repo(tmp_path_factory) -> tuple[Path, Path]:
    """The default repository as ``make serve`` builds it (the run kept in <repo>/.build)."""
    repo = tmp_path_factory.mktemp("e2e") / "models"
    result = build_default_repo("--repo", str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "not published" not in result.stderr, result.stderr
    return repo, repo / ".build" / "digits_cnn"


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
        assert accuracy(infer(channel, "digits_cnn", test.x, batch=1), test.y) == served_accuracy["digits_cnn"]
    assert served_accuracy["digits_cnn"] >= 0.95
    assert served_accuracy["digits_cnn"] - served_accuracy["digits_cnn_int8"] <= 0.01  # INT8 within 1 point


def test_build_default_repo_is_a_no_op_the_second_time(default_repo):
    repo, _ = default_repo
    result = build_default_repo("--repo", str(repo), timeout=60)
    assert result.returncode == 0 and "nothing to do" in result.stdout
    visible = sorted(p.name for p in (repo / "digits_cnn").iterdir() if not p.name.startswith("."))
    assert visible == ["1", "config.toml"]


def test_published_files_are_readable_and_name_a_real_checkpoint(default_repo):
    repo, run = default_repo
    for model in MODELS:
        config = repo / model / "config.toml"
        model_file = repo / model / "1" / load_model_config(repo / model).model_filename
        # Same mode as the model files (0644 under the usual umask 022), not mkstemp's 0600.
        assert stat.S_IMODE(config.stat().st_mode) == stat.S_IMODE(model_file.stat().st_mode)
        assert stat.S_IMODE(config.stat().st_mode) == 0o666 & ~current_umask()
        source = Path(load_model_config(repo / model).metadata["source_checkpoint"])
        assert not source.is_absolute()  # relative to the repository: no host path in what clients read
        assert (repo / source).resolve() == (run / "best.pt").resolve() and (repo / source).is_file()  # kept


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_a_model_that_misses_its_gate_is_reported_and_the_build_goes_on(default_repo, tmp_path):
    """The INT8 gate refuses a model: one line, exit 0, the others served; a rerun neither retrains
    nor fails; --force publishes it."""
    repo, run = default_repo
    copy = tmp_path / "models"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns("digits_cnn_int8"))
    report_path = copy / ".build" / "digits_cnn" / "export" / "quantize_report.json"
    report = json.loads(report_path.read_text())
    report.update(accuracy_drop_points=1.12, int8_accuracy=report["fp32_accuracy"] - 0.0112)
    report_path.write_text(json.dumps(report))
    for _ in range(2):  # what a second 'make serve' sees
        result = build_default_repo("--repo", str(copy), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no retraining" in result.stdout and "trained in" not in result.stdout
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("build-default-repo: digits_cnn_int8 not published")
        assert "dropped 1.12 points" in lines[0] and "--force" in lines[0]
        assert not (copy / "digits_cnn_int8").exists() and (copy / "digits_cnn" / "1").is_dir()
    forced = build_default_repo("--repo", str(copy), "--force", timeout=120)
    assert forced.returncode == 0 and "digits_cnn_int8 version 1" in forced.stdout, forced.stderr
    assert load_model_config(copy / "digits_cnn_int8").metadata["accuracy_drop_points"] == "1.12"


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(
    QEMU is None,
    reason="qemu-x86_64 is not installed (Debian: apt-get install qemu-user): ONNX Runtime picks its INT8 "
    "kernels from CPUID, and only an emulated CPU can show another machine's",
)
def test_int8_answers_do_not_depend_on_the_serving_cpu(default_repo, tmp_path):
    """The published INT8 model gives the same logits on ONNX Runtime's AVX2 kernels (an emulated
    Haswell: no AVX-512, no VNNI) as here. With 8-bit weights those kernels overflow 16-bit pair
    sums and such files lost up to 3.0 points there; 7-bit weights (reduce_range) cannot."""
    repo, run = default_repo
    test = splits_of(load_trained(run / "best.pt")[1]).test
    np.save(tmp_path / "x.npy", test.x)
    model = repo / "digits_cnn_int8" / "1" / "model.onnx"
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        "o = ort.SessionOptions(); o.log_severity_level = 3\n"
        "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
        "np.save(sys.argv[3], s.run(None, {'INPUT0': np.load(sys.argv[2])})[0])\n"
    )
    args = [sys.executable, "-c", script, str(model), str(tmp_path / "x.npy")]
    subprocess.run([*args, str(tmp_path / "here.npy")], check=True, timeout=120)
    emulated = subprocess.run(
        [QEMU, "-cpu", "Haswell", *args, str(tmp_path / "haswell.npy")], capture_output=True, text=True, timeout=600
    )
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    here, haswell = np.load(tmp_path / "here.npy"), np.load(tmp_path / "haswell.npy")
    assert np.array_equal(here.argmax(1), haswell.argmax(1))
    np.testing.assert_allclose(here, haswell, atol=1e-4)  # integer sums agree; only float rescaling may differ
