"""Export parity for every built-in model family: TorchScript and ONNX outputs match the eager
model at batch sizes 1, 7 and 64; the ONNX file has a dynamic batch and named tensors; INT8
quantization (static and dynamic) produces a runnable model and a report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tensorwire.trainer import cli
from tensorwire.trainer.config import ExportOptions, FitOptions, QuantizeOptions
from tensorwire.trainer.data import load_splits
from tensorwire.trainer.export import export
from tensorwire.trainer.models import build_model
from tensorwire.trainer.quantize import quantize
from tensorwire.trainer.runfolder import RunFolder, save_checkpoint
from tensorwire.trainer.worker import model_spec

FAMILIES = ["mlp", "cnn", "transformer"]


def make_run(root: Path, family: str) -> RunFolder:
    """A run folder whose best.pt holds a briefly trained model, without launching DDP."""
    options = FitOptions(data="digits", model=family, run=str(root))
    config = dataclasses.asdict(options)
    splits = load_splits(options.data_spec())
    spec = model_spec(config, splits)
    torch.manual_seed(0)
    model = build_model(family, spec["input_shape"], spec["num_classes"], {}, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.from_numpy(splits.train.x), torch.from_numpy(splits.train.y)
    for start in range(0, 640, 64):  # a few steps: realistic batch-norm statistics and logits
        loss = torch.nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run = RunFolder.at(root)
    save_checkpoint(
        {
            "epoch": 1,
            "model": model.state_dict(),
            "config": config,
            "model_spec": spec,
            "metrics": {"val_accuracy": 0.0},
        },
        run.best,
    )
    return run


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tmp_path_factory) -> tuple[str, RunFolder, dict]:
    run = make_run(tmp_path_factory.mktemp(request.param), request.param)
    report = export(ExportOptions(run=str(run.root), verify_batch_sizes=[1, 7, 64]))
    return request.param, run, report


def test_report_bounds_the_difference_at_each_batch_size(exported):
    _, run, report = exported
    for fmt in ("onnx", "torchscript"):
        diffs = report[fmt]["max_abs_diff"]
        assert set(diffs) == {"1", "7", "64"}
        assert max(diffs.values()) < 1e-4, diffs
    assert json.loads(run.export_report.read_text()) == report


def test_onnx_and_torchscript_match_eager_independently(exported):
    family, run, _ = exported
    from tensorwire.trainer.artifacts import load_trained

    model, _ = load_trained(run.best)
    session = ort.InferenceSession(str(run.onnx), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(run.torchscript))
    rng = np.random.default_rng(1)
    for batch in (1, 7, 64):
        x = rng.uniform(0, 1, size=(batch, 1, 8, 8)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
            got_ts = scripted(torch.from_numpy(x)).numpy()
        (got_onnx,) = session.run(["OUTPUT0"], {"INPUT0": x})
        assert got_onnx.shape == want.shape == (batch, 10)
        np.testing.assert_allclose(got_onnx, want, atol=1e-4, err_msg=f"{family} ONNX, batch {batch}")
        np.testing.assert_allclose(got_ts, want, atol=1e-4, err_msg=f"{family} TorchScript, batch {batch}")


def test_onnx_file_is_self_contained_with_a_dynamic_batch(exported):
    _, run, _ = exported
    model = onnx.load(str(run.onnx))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "INPUT0" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 8, 8]
    assert [o.name for o in model.graph.output] == ["OUTPUT0"]
    assert sorted(p.name for p in run.export_dir.iterdir()) == [
        "export_report.json",
        "model.onnx",
        "model.pt",
    ]


def test_quantize_static_and_dynamic(exported):
    family, run, _ = exported
    modes = ["static", "dynamic"] if family != "cnn" else ["static"]
    for mode in modes:
        report = quantize(QuantizeOptions(run=str(run.root), mode=mode, calibration_samples=64))
        assert report["mode"] == mode and 0 <= report["int8_accuracy"] <= 1
        session = ort.InferenceSession(str(run.int8), providers=["CPUExecutionProvider"])
        assert session.run(None, {"INPUT0": np.zeros((7, 1, 8, 8), np.float32)})[0].shape == (7, 10)
        ops = {node.op_type for node in onnx.load(str(run.int8)).graph.node}
        if mode == "dynamic":
            assert "ConvInteger" not in ops and ("MatMulInteger" in ops or "DynamicQuantizeLinear" in ops)


def test_dynamic_quantization_never_touches_convolutions(tmp_path):
    run = make_run(tmp_path, "cnn")
    export(ExportOptions(run=str(run.root), formats=["onnx"]))
    report = quantize(QuantizeOptions(run=str(run.root), mode="dynamic"))
    ops = [node.op_type for node in onnx.load(str(run.int8)).graph.node]
    assert "ConvInteger" not in ops and "Conv" in ops
    assert report["convolutions_left_fp32"] is True


def test_export_fails_clearly_without_a_checkpoint(tmp_path, capsys):
    assert cli.export(["--run", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("tensorwire export: error:") and "no such checkpoint" in err and err.count("\n") == 1
    )


def test_quantize_fails_clearly_without_an_onnx_export(tmp_path, capsys):
    assert cli.quantize(["--run", str(tmp_path)]) == 2
    assert "run 'tensorwire export" in capsys.readouterr().err


def test_unexportable_user_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """Data-dependent control flow cannot be exported: one line, the user's line, details in a file."""
    (tmp_path / "branchy_models.py").write_text(
        "from torch import nn\n"
        "class Branchy(nn.Module):\n"
        "    def __init__(self, classes):\n"
        "        super().__init__()\n"
        "        self.head = nn.Linear(64, classes)\n"
        "    def forward(self, x):\n"
        "        x = x.flatten(1)\n"
        "        if x.sum() > 0:\n"
        "            return self.head(x)\n"
        "        return -self.head(x)\n"
        "def make(input_shape, num_classes):\n"
        "    return Branchy(num_classes)\n"
    )
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    options = FitOptions(data="digits", model="branchy_models:make", run=str(run))
    splits = load_splits(options.data_spec())
    model = build_model(options.model, (1, 8, 8), 10)
    spec = model_spec(dataclasses.asdict(options), splits)
    state = {
        "epoch": 1,
        "model": model.state_dict(),
        "config": dataclasses.asdict(options),
        "model_spec": spec,
        "metrics": {"val_accuracy": 0.0},
    }
    save_checkpoint(state, RunFolder.at(run).best)
    assert cli.export(["--run", str(run), "--formats", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tensorwire export: error: ONNX export failed:") and err.count("\n") == 1
    assert "branchy_models.py:8" in err and (run / "export" / "onnx_export_error.log").exists()
