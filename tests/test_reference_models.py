"""The benchmark reference models: valid repository entries, finite outputs on the perf inputs, sizes."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

from tensorwire.loadtest import reference_models as rm
from tensorwire.repository import list_models, load_model_config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    models = rm.build_repository(root / "models", log=lambda *_: None)
    return root, {m.name: m for m in models}


def test_repository_layout_and_configs(built):
    root, models = built
    repo = root / "models"
    names = ["cnn", "cnn_nobatch", "identity", "identity_nobatch", "wide_mlp", "wide_mlp_nobatch"]
    assert list_models(repo) == names
    for name in names:
        config = load_model_config(repo / name)  # the server's own validation
        base = name.removesuffix("_nobatch")
        assert config.backend == "onnxruntime" and config.max_batch_size == 64
        in_dims, out_dims = rm.SHAPES[base]
        assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("INPUT0", "FP32", in_dims)]
        assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [("OUTPUT0", "FP32", out_dims)]
        assert config.batching is (not name.endswith("_nobatch"))
        group = config.instance_group[0]
        assert (group.kind, group.count, group.threads) == ("cpu", *rm.DEFAULT_INSTANCES[base])
        assert (repo / name / "1" / "model.onnx").is_file()
        assert (root / "perf_inputs" / f"{name}.json").is_file()
    # the no-batching twin shares its model file instead of copying 84 MB
    assert (repo / "wide_mlp/1/model.onnx").samefile(repo / "wide_mlp_nobatch/1/model.onnx")


@pytest.mark.parametrize("name", ["identity", "cnn", "wide_mlp"])
def test_outputs_finite_on_perf_inputs(built, name):
    root, models = built
    doc = json.loads((root / "perf_inputs" / f"{name}.json").read_text())
    assert len(doc["data"]) >= 2
    for entry in doc["data"]:  # perf_analyzer's format: flat content, shape without the batch dim
        assert set(entry) == {"INPUT0"}
        assert entry["INPUT0"]["shape"] == rm.SHAPES[name][0]
        assert len(entry["INPUT0"]["content"]) == np.prod(rm.SHAPES[name][0])
    x = rm.load_perf_inputs(root / "perf_inputs" / f"{name}.json")
    assert np.isfinite(x).all() and x.std() > 0.5
    session = ort.InferenceSession(str(models[name].path), providers=["CPUExecutionProvider"])
    for batch in (1, len(x)):
        (y,) = session.run(["OUTPUT0"], {"INPUT0": x[:batch]})
        assert y.shape == (batch, *rm.SHAPES[name][1])
        assert np.isfinite(y).all() and np.abs(y).max() < 1e3
    if name == "identity":
        np.testing.assert_array_equal(y, x)


def test_sizes(built):
    _, models = built
    assert 50e6 <= models["cnn"].flops <= 70e6
    assert models["cnn"].config.metadata["flops_per_sample"] == str(models["cnn"].flops)
    assert 20e6 <= models["wide_mlp"].params <= 22e6
    assert models["wide_mlp"].flops == 2 * (512 * 4096 + 4096 * 4096 + 4096 * 512)
    assert 80e6 < models["wide_mlp"].path.stat().st_size < 90e6


def test_cnn_macs_counted_from_shapes():
    import torch.nn as nn

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    expected = 8 * 8 * 8 * 3 * 9 + 4 * 4 * 8 * 4 * 9 + 128 * 10
    assert rm.count_conv_linear_macs(net, [3, 8, 8]) == expected


def test_cli_options(tmp_path):
    assert rm.main(["--repo", str(tmp_path / "m"), "--models", "identity", "--variants", "nobatch",
                    "--inputs-dir", str(tmp_path / "in"), "--instances", "identity=2x1"]) == 0
    assert list_models(tmp_path / "m") == ["identity_nobatch"]
    config = load_model_config(tmp_path / "m" / "identity_nobatch")
    assert not config.dynamic_batching.enabled and config.instance_group[0].count == 2
    assert (tmp_path / "in" / "identity_nobatch.json").is_file()
    for bad in (["--models", "resnet50"], ["--instances", "cnn=2"], ["--instances", "vgg=1x1"]):
        with pytest.raises(SystemExit):
            rm.main(["--repo", str(tmp_path / "m"), *bad])
