"""Triton's own Python client (``tritonclient.grpc``) works against tensorwire unchanged.

tritonclient registers its generated messages in protobuf's default pool under
package ``inference``; tensorwire's live in ``tensorwire.v2``. Both are
imported into this one process and both talk to the same server, which proves
they coexist and that only the wire path and field numbers matter.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

# tritonclient (package `inference` in the default pool) is imported before ours (`tensorwire.v2`).
import tritonclient.grpc as tritongrpc
from model_factory import onnx_add_sub, onnx_identity
from serving import call, running_server
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.grpc import service_pb2 as triton_pb
from tritonclient.utils import InferenceServerException

from tensorwire.proto import inference_pb2 as pb

MODELS = ("add_sub", "text", "ids", "counted", "toggle")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("interop") / "models"
    onnx_add_sub(repo, "add_sub", max_batch_size=8)
    onnx_identity(repo, "text", datatype="BYTES", dims=[-1], max_batch_size=8)
    onnx_identity(repo, "ids", datatype="INT64", dims=[4], max_batch_size=8)
    onnx_identity(repo, "counted", datatype="FP32", dims=[4], max_batch_size=8)
    onnx_identity(repo, "toggle", datatype="FP32", dims=[4], max_batch_size=8)
    with running_server(repo) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    triton = tritongrpc.InferenceServerClient(server.address)
    yield triton
    triton.close()


def _input(name: str, array: np.ndarray, datatype: str) -> tritongrpc.InferInput:
    tensor = tritongrpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _add_sub_inputs(rows: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, 16)).astype(np.float32)
    b = rng.standard_normal((rows, 16)).astype(np.float32)
    return a, b, [_input("INPUT0", a, "FP32"), _input("INPUT1", b, "FP32")]


# ---------------------------------------------------------------- coexistence


def test_both_generated_modules_coexist_in_one_process(server, client):
    assert triton_pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert pb.ModelInferRequest.DESCRIPTOR.full_name.startswith("tensorwire.")
    assert pb.ModelInferRequest.DESCRIPTOR.full_name != triton_pb.ModelInferRequest.DESCRIPTOR.full_name
    # Both clients talk to the same server from this process.
    assert client.is_server_live()
    with server.channel() as channel:
        ours = call(channel, "ServerMetadata", pb.ServerMetadataRequest())
    theirs = client.get_server_metadata()
    assert isinstance(theirs, triton_pb.ServerMetadataResponse)
    assert (ours.name, ours.version, list(ours.extensions)) == (
        theirs.name, theirs.version, list(theirs.extensions))


# ------------------------------------------------------------ health/metadata


def test_live_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    for name in MODELS:
        assert client.is_model_ready(name), name
        assert client.is_model_ready(name, "1"), name


def test_server_metadata(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "tensorwire"
    assert metadata.version
    assert "statistics" in metadata.extensions
    as_json = client.get_server_metadata(as_json=True)
    assert "statistics" in as_json["extensions"]


def test_model_metadata_has_batch_dim(client):
    metadata = client.get_model_metadata("add_sub")
    assert metadata.name == "add_sub"
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("OUTPUT0", "FP32", [-1, 16]), ("OUTPUT1", "FP32", [-1, 16])]
    text = client.get_model_metadata("text", as_json=True)
    assert text["inputs"][0]["datatype"] == "BYTES"
    assert [int(d) for d in text["inputs"][0]["shape"]] == [-1, -1]


def test_model_config(client):
    response = client.get_model_config("add_sub")
    config = response.config
    assert config.name == "add_sub"
    assert config.max_batch_size == 8
    assert config.platform == "onnxruntime_onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", triton_config_pb.TYPE_FP32, [16]), ("INPUT1", triton_config_pb.TYPE_FP32, [16])]
    assert [t.name for t in config.output] == ["OUTPUT0", "OUTPUT1"]
    assert config.HasField("dynamic_batching")

    as_json = client.get_model_config("text", as_json=True)["config"]  # snake_case, as perf_analyzer reads it
    assert as_json["name"] == "text"
    assert as_json["max_batch_size"] == 8
    assert as_json["input"][0]["name"] == "INPUT0"
    assert as_json["input"][0]["data_type"] == "TYPE_STRING"
    assert [int(d) for d in as_json["input"][0]["dims"]] == [-1]  # int64 -> JSON strings
    assert as_json["output"][0]["data_type"] == "TYPE_STRING"


# ------------------------------------------------------------------ inference


def test_infer_fp32_add_sub(client):
    a, b, inputs = _add_sub_inputs(rows=3)
    result = client.infer("add_sub", inputs, request_id="req-42")
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == "add_sub"
    assert response.model_version == "1"
    assert result.as_numpy("OUTPUT0").dtype == np.float32


def test_infer_with_priority_and_timeout_parameters(client):
    # tritonclient sends priority as uint64 and timeout (µs) as int64 parameters.
    a, b, inputs = _add_sub_inputs(rows=1, seed=1)
    result = client.infer("add_sub", inputs, priority=1, timeout=5_000_000)
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), a + b, rtol=1e-6)


def test_infer_requested_subset_of_outputs(client):
    a, b, inputs = _add_sub_inputs(rows=2, seed=2)
    result = client.infer("add_sub", inputs, outputs=[tritongrpc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    assert result.as_numpy("OUTPUT0") is None
    np.testing.assert_allclose(result.as_numpy("OUTPUT1"), a - b, rtol=1e-6)


def test_infer_bytes_non_ascii_and_empty(client):
    words = ["héllo", "", "日本語", "zero\x00byte", "emoji 🙂", ""]
    array = np.array([w.encode("utf-8") for w in words], dtype=np.object_).reshape(2, 3)
    result = client.infer("text", [_input("INPUT0", array, "BYTES")])
    out = result.as_numpy("OUTPUT0")
    assert out.shape == (2, 3)
    assert [x.decode("utf-8") for x in out.reshape(-1)] == words
    assert result.get_response().outputs[0].datatype == "BYTES"


def test_infer_int64(client):
    array = np.array([[0, -1, 2**62, -(2**63)], [7, 8, 9, 2**63 - 1]], dtype=np.int64)
    result = client.infer("ids", [_input("INPUT0", array, "INT64")])
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, array)


def test_async_infer_callback(client):
    done: queue.Queue = queue.Queue()
    expected = {}
    for i in range(4):
        a, b, inputs = _add_sub_inputs(rows=1 + i % 2, seed=10 + i)
        expected[f"async-{i}"] = a + b
        client.async_infer(
            "add_sub", inputs, request_id=f"async-{i}",
            callback=lambda result, error: done.put((result, error)),
        )
    seen = set()
    for _ in range(4):
        result, error = done.get(timeout=10)
        assert error is None, error
        request_id = result.get_response().id
        np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected[request_id], rtol=1e-6)
        seen.add(request_id)
    assert seen == set(expected)


def test_streaming_in_order_with_in_band_error(client):
    responses: queue.Queue = queue.Queue()

    def callback(result, error):  # tritonclient passes both as keyword arguments
        responses.put((result, error))

    client.start_stream(callback=callback)
    try:
        sent = []
        for i in range(6):
            a, b, inputs = _add_sub_inputs(rows=1 + i % 3, seed=100 + i)
            client.async_stream_infer("add_sub", inputs, request_id=f"s{i}")
            sent.append((f"s{i}", a + b))
        # An error for an unknown model comes back in-band; the stream stays open.
        _, _, inputs = _add_sub_inputs(rows=1)
        client.async_stream_infer("no_such_model", inputs, request_id="bad")
        sent.append(("bad", None))
        for i in range(6, 9):
            a, b, inputs = _add_sub_inputs(rows=2, seed=100 + i)
            client.async_stream_infer("add_sub", inputs, request_id=f"s{i}")
            sent.append((f"s{i}", a + b))

        for request_id, expected in sent:
            result, error = responses.get(timeout=10)
            if expected is None:
                assert result is None
                assert isinstance(error, InferenceServerException)
                assert "no_such_model" in error.message()
                assert "NOT_FOUND" in error.message()
            else:
                assert error is None, error
                assert result.get_response().id == request_id
                np.testing.assert_allclose(result.as_numpy("OUTPUT0"), expected, rtol=1e-6)
    finally:
        client.stop_stream()
    assert responses.empty()


def test_inference_statistics(client):
    rows = [1, 2, 3]
    for n in rows:
        array = np.full((n, 4), n, dtype=np.float32)
        client.infer("counted", [_input("INPUT0", array, "FP32")])
    stats = client.get_inference_statistics("counted")
    assert isinstance(stats, triton_pb.ModelStatisticsResponse)
    [model] = stats.model_stats
    assert (model.name, model.version) == ("counted", "1")
    assert model.inference_count == sum(rows)
    assert 1 <= model.execution_count <= len(rows)
    assert model.inference_stats.success.count == len(rows)
    assert model.inference_stats.fail.count == 0
    assert model.last_inference > 0
    as_json = client.get_inference_statistics("counted", as_json=True)
    assert int(as_json["model_stats"][0]["inference_count"]) == sum(rows)
    everything = client.get_inference_statistics()
    assert {"add_sub", "counted"} <= {m.name for m in everything.model_stats}


def test_repository_index(client):
    index = client.get_model_repository_index()
    rows = {(m.name, m.version): m.state for m in index.models}
    for name in MODELS:
        assert rows.get((name, "1")) == "READY", rows
    as_json = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in as_json["models"]} >= set(MODELS)


def test_unload_then_load(client):
    array = np.ones((1, 4), dtype=np.float32)
    assert client.is_model_ready("toggle")
    client.unload_model("toggle")
    assert not client.is_model_ready("toggle")
    with pytest.raises(InferenceServerException) as caught:
        client.infer("toggle", [_input("INPUT0", array, "FP32")])
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states["toggle"] == "UNAVAILABLE"

    client.load_model("toggle")
    deadline = time.monotonic() + 10
    while not client.is_model_ready("toggle") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.is_model_ready("toggle")
    result = client.infer("toggle", [_input("INPUT0", array, "FP32")])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


# ---------------------------------------------------------------- error codes


def test_unknown_model_is_not_found(client):
    _, _, inputs = _add_sub_inputs(rows=1)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("no_such_model", inputs)
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert "no_such_model" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("no_such_model")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as caught:
        client.infer("add_sub", inputs, model_version="7")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_wrong_shape_is_invalid_argument(client):
    bad = np.zeros((1, 15), dtype=np.float32)
    good = np.zeros((1, 16), dtype=np.float32)
    with pytest.raises(InferenceServerException) as caught:
        client.infer("add_sub", [_input("INPUT0", bad, "FP32"), _input("INPUT1", good, "FP32")])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT0" in caught.value.message()
    # The server keeps serving.
    a, b, inputs = _add_sub_inputs(rows=1)
    np.testing.assert_allclose(client.infer("add_sub", inputs).as_numpy("OUTPUT0"), a + b, rtol=1e-6)
