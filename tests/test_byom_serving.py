"""Bring your own model, served: folders with no configuration, a config.toml with only
``max_batch_size``, the silero VAD model from its PyPI wheel, Triton's reshape, a Python model whose
backend follows from its file, and a model folder added while the server runs.

One real server on loopback serves the whole repository; the tests call it over gRPC with the SDK.
"""

from __future__ import annotations

import re
import shutil
import textwrap

import numpy as np
import pytest
from byom_models import silero_vad_onnx, token_pooler, vector_scaler, wait_settled
from serving import running_server

from tensorwire.client import InferenceClient
from tensorwire.client.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from tensorwire.proto import inference_pb2 as pb

SILERO_REFUSAL = "input 'sr' has no dimensions, but max_batch_size > 0 needs a batch one"
MODELS = ["bert_like", "bert_16", "bert_unbatched", "vad", "vad_batched", "scaler", "py_echo"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("byom") / "models"
    token_pooler(repo / "bert_like" / "1" / "model.onnx")  # nothing else: no config.toml
    token_pooler(repo / "bert_16" / "1" / "model.onnx")
    (repo / "bert_16" / "config.toml").write_text("max_batch_size = 16\n")
    token_pooler(repo / "bert_unbatched" / "2" / "model.onnx")
    (repo / "bert_unbatched" / "config.toml").write_text("max_batch_size = 0\n")
    silero_vad_onnx(repo / "vad" / "1" / "model.onnx")
    silero_vad_onnx(repo / "vad_batched" / "1" / "model.onnx")
    (repo / "vad_batched" / "config.toml").write_text("max_batch_size = 16\n")
    vector_scaler(repo / "scaler" / "1" / "model.onnx", scale=2.0)
    (repo / "scaler" / "config.toml").write_text(
        textwrap.dedent(
            """\
            max_batch_size = 8
            inputs = [{ name = "x", datatype = "FP32", dims = [1], reshape = [] }]
            outputs = [{ name = "y", datatype = "FP32", dims = [1], reshape = [] }]
            """
        )
    )
    (repo / "py_echo" / "1").mkdir(parents=True)
    (repo / "py_echo" / "1" / "model.py").write_text(
        "class Model:\n    def execute(self, inputs):\n        return {'OUT': inputs['IN'] * 3}\n"
    )
    (repo / "py_echo" / "config.toml").write_text(
        textwrap.dedent(
            """\
            inputs = [{ name = "IN", datatype = "INT32", dims = [2] }]
            outputs = [{ name = "OUT", datatype = "INT32", dims = [2] }]
            """
        )
    )
    with running_server(repo, wait=False) as running:
        running.extra["repo"] = repo
        running.extra["states"] = wait_settled(running, MODELS)
        yield running


@pytest.fixture(scope="module")
def client(server):
    with InferenceClient(server.address, timeout=30) as sdk:
        yield sdk


def tokens(rows: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 1000, size=(rows, length), dtype=np.int64)
    mask = (rng.random((rows, length)) < 0.8).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def pooled(feeds: dict[str, np.ndarray]) -> np.ndarray:
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    return np.stack([(ids * mask).sum(axis=1), mask.sum(axis=1)], axis=1).astype(np.float32)


def test_every_model_settles_as_expected(server):
    states = server.extra["states"]
    assert {name: state for name, (state, _) in states.items() if name in MODELS} == {
        "bert_like": "READY",
        "bert_16": "READY",
        "bert_unbatched": "READY",
        "vad": "READY",
        "vad_batched": "UNAVAILABLE",
        "scaler": "READY",
        "py_echo": "READY",
    }


def test_no_configuration_at_all_serves_batched(server, client):
    """1/model.onnx alone: backend from the file, tensors from the model, and (every tensor has a
    variable leading dimension) batched with the default max_batch_size and the dynamic batcher on."""
    config = client.model_config("bert_like")
    assert (config.platform, config.backend, config.max_batch_size) == ("onnxruntime_onnx", "onnxruntime", 16)
    assert config.HasField("dynamic_batching")
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in config.input] == [
        ("input_ids", "TYPE_INT64", [-1]),
        ("attention_mask", "TYPE_INT64", [-1]),
    ]
    assert [(t.name, list(t.dims)) for t in config.output] == [("logits", [2])]
    metadata = client.model_metadata("bert_like")
    assert [list(t.shape) for t in metadata.inputs] == [[-1, -1], [-1, -1]]
    feeds = tokens(16, 7)
    np.testing.assert_array_equal(client.infer("bert_like", feeds)["logits"], pooled(feeds))
    with pytest.raises(InvalidInputError, match="exceeds the model's max_batch_size 16"):
        client.infer("bert_like", tokens(17, 7))
    log = server.log()
    assert "event=config_inferred model=bert_like config=(none) backend=onnxruntime (from 1/model.onnx)" in log
    assert re.search(
        r"event=auto_complete model=bert_like:1 max_batch_size=16 dynamic_batching=on "
        r"reason='every input and output has a variable leading dimension'",
        log,
    ), log


def test_config_toml_with_only_max_batch_size(server, client):
    config = client.model_config("bert_16")
    assert (config.backend, config.max_batch_size) == ("onnxruntime", 16) and config.HasField("dynamic_batching")
    feeds = tokens(3, 11, seed=1)
    np.testing.assert_array_equal(client.infer("bert_16", feeds)["logits"], pooled(feeds))
    assert "event=config_inferred model=bert_16 config=config.toml backend=onnxruntime (from 1/model.onnx)" in (
        server.log()
    )
    assert "event=auto_complete model=bert_16" not in server.log()  # given, not completed


def test_explicit_zero_means_no_batch_dimension(server, client):
    config = client.model_config("bert_unbatched")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [list(t.dims) for t in config.input] == [[-1, -1], [-1, -1]]  # the full shape
    feeds = tokens(5, 3, seed=2)  # the model's own leading dimension, not a batch one
    np.testing.assert_array_equal(client.infer("bert_unbatched", feeds)["logits"], pooled(feeds))


def test_silero_vad_serves_without_configuration(server, client):
    """A real outside model: stateful, with a rank-0 ``sr`` input, so it has no batch dimension."""
    config = client.model_config("vad")
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    metadata = client.model_metadata("vad")
    assert {t.name: list(t.shape) for t in metadata.inputs} == {
        "input": [-1, -1],
        "state": [2, -1, 128],
        "sr": [],
    }
    samples = np.sin(np.arange(512, dtype=np.float32) * 2 * np.pi * 440 / 16000)[None, :] * 0.5
    result = client.infer(
        "vad",
        {"input": samples, "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)},
    )
    assert result["output"].shape == (1, 1) and 0.0 <= float(result["output"][0, 0]) <= 1.0
    assert result["stateN"].shape == (2, 1, 128)
    assert (
        'event=auto_complete model=vad:1 max_batch_size=0 dynamic_batching=off reason="no batch dimension: '
        "input 'state' has a fixed leading dimension 2; input 'sr' has no dimensions\""
    ) in server.log()


def test_silero_vad_keeps_its_refusal_to_batch(server, client):
    """Asked to batch (max_batch_size = 16), silero's rank-0 ``sr`` input has no batch dimension: the
    model is UNAVAILABLE with that reason, and the server keeps serving the others."""
    state, reason = server.extra["states"]["vad_batched"]
    assert state == "UNAVAILABLE" and SILERO_REFUSAL in reason, reason
    with pytest.raises(UnavailableError, match=re.escape(SILERO_REFUSAL)):
        client.infer("vad_batched", {"sr": np.array(16000, np.int64)})
    assert client.server_live()
    feeds = tokens(1, 4)
    np.testing.assert_array_equal(client.infer("bert_like", feeds)["logits"], pooled(feeds))


def test_triton_reshape_is_honoured(client):
    """dims [1] for clients, [] for the model: a [batch] model served as [batch, 1]."""
    config = client.model_config("scaler")
    assert [(list(t.dims), list(t.reshape.shape), t.HasField("reshape")) for t in config.input] == [([1], [], True)]
    assert [list(t.shape) for t in client.model_metadata("scaler").inputs] == [[-1, 1]]
    x = np.array([[1.0], [2.5], [-4.0]], np.float32)
    y = client.infer("scaler", {"x": x})["y"]
    assert y.shape == (3, 1)
    np.testing.assert_array_equal(y, x * 2)


def test_python_model_backend_follows_from_model_py(server, client):
    config = client.model_config("py_echo")
    assert (config.backend, config.platform, config.max_batch_size) == ("python", "python", 0)
    out = client.infer("py_echo", {"IN": np.array([4, -5], np.int32)})["OUT"]
    np.testing.assert_array_equal(out, [12, -15])
    assert "event=auto_complete model=py_echo:1 max_batch_size=0" in server.log()
    assert "set max_batch_size to serve it batched" in server.log()


def test_a_model_folder_added_later_loads_without_configuration(server, client):
    repo = server.extra["repo"]
    token_pooler(repo / ".staging" / "model.onnx")  # written elsewhere, then moved in whole
    (repo / "late" / "4").mkdir(parents=True)
    shutil.move(repo / ".staging" / "model.onnx", repo / "late" / "4" / "model.onnx")
    client.load_model("late")
    config = client.model_config("late")
    assert (config.backend, config.max_batch_size) == ("onnxruntime", 16)
    feeds = tokens(2, 9, seed=3)
    np.testing.assert_array_equal(client.infer("late", feeds)["logits"], pooled(feeds))
    assert "late" in [m.name for m in client.repository_index()]
    with pytest.raises(
        ModelNotFoundError, match="no absent/ folder with a config.toml, config.pbtxt or version folder"
    ):
        client.load_model("absent")
