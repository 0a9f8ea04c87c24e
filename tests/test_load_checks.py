"""Load-time checks, client mistakes reported as such, and client-facing messages that leak nothing.

Real server subprocess, real gRPC."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from infer_helpers import InputTensor, infer_request, outputs_of
from model_factory import _save, _value, onnx_gather, onnx_identity, python_model, write_config
from onnx import helper
from ops_models import garbage_onnx
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb


def onnx_fixed_batch(repo, name: str, max_batch_size: int) -> None:
    """Identity on INPUT0 FP32 [1, 16]: the first dimension is fixed at 1 in the model file."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [_value("INPUT0", "FP32", [1, 16])],
        [_value("OUTPUT0", "FP32", [1, 16])],
    )
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": max_batch_size})
    _save(helper.make_model(graph), repo, name, 1)


def onnx_add_lengths(repo, name: str = "lengths") -> None:
    """SUM = IDS + MASK on [batch, n] and [batch, m]: lengths that differ do not broadcast in ONNX Runtime."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["IDS", "MASK"], ["SUM"])],
        name,
        [_value("IDS", "FP32", ["batch", "n"]), _value("MASK", "FP32", ["batch", "m"])],
        [_value("SUM", "FP32", ["batch", "n"])],
    )
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": 8})
    _save(helper.make_model(graph), repo, name, 1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("checks") / "repo"
    onnx_fixed_batch(repo, "fixed_one", max_batch_size=8)
    onnx_fixed_batch(repo, "fixed_one_single", max_batch_size=1)
    onnx_gather(repo, "lookup", max_batch_size=16, dynamic_batching={"max_queue_delay_us": 0})
    onnx_add_lengths(repo)
    onnx_identity(repo, "variable", dims=[-1], max_batch_size=8)
    python_model(
        repo,
        "zero_hater",
        """
        class Model:
            def execute(self, inputs):
                if not inputs["X"].any():
                    raise ValueError("zeros are not welcome here")
                return {"Y": inputs["X"]}
        """,
        {
            "max_batch_size": 4,
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
        },
    )
    garbage_onnx(repo, "corrupt")
    with running_server(repo, "--drain-seconds", "0", "--no-strict-readiness") as srv:
        srv.extra["repo"] = repo
        yield srv


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as ch:
        yield ch


def index(channel) -> dict[tuple[str, str], tuple[str, str]]:
    rows = call(channel, "RepositoryIndex", pb.RepositoryIndexRequest()).models
    return {(m.name, m.version): (m.state, m.reason) for m in rows}


def status(channel, method: str, message, timeout: float = 30) -> tuple[grpc.StatusCode, str]:
    try:
        call(channel, method, message, timeout=timeout)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return grpc.StatusCode.OK, ""


def test_fixed_leading_dimension_is_refused_at_load(channel):
    state, reason = index(channel)[("fixed_one", "")]
    assert state == "UNAVAILABLE"
    assert "fixed at 1" in reason and "max_batch_size 8" in reason and "refused" in reason
    code, details = status(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="fixed_one"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "fixed at 1" in details
    # max_batch_size 1 fits a leading dimension fixed at 1: served.
    x = np.ones((1, 16), np.float32)
    out = outputs_of(call(channel, "ModelInfer", infer_request("fixed_one_single", {"INPUT0": x})))["OUTPUT0"]
    np.testing.assert_array_equal(out, x)


def test_warmup_failure_is_a_load_failure_with_its_reason(channel):
    state, reason = index(channel)[("zero_hater", "")]
    assert state == "UNAVAILABLE" and "warm-up failed" in reason and "zeros are not welcome here" in reason


def test_runtime_data_errors_are_invalid_argument_and_spare_companions(channel):
    def lookup(i: int):
        message = infer_request("lookup", {"INDEX": np.array([[i]], np.int64)})
        try:
            return float(outputs_of(call(channel, "ModelInfer", message, timeout=30))["OUTPUT0"][0, 0])
        except grpc.RpcError as err:
            return err.code(), err.details()

    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(range(8), pool.map(lookup, [1, 2, 3, 12, 4, 5, 6, 7]), strict=True))
    code, details = results.pop(3)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "lookup:1" in details and "out of data bounds" in details
    assert results == {0: 10.0, 1: 20.0, 2: 30.0, 4: 40.0, 5: 50.0, 6: 60.0, 7: 70.0}
    message = infer_request("lengths", {"IDS": np.ones((1, 3), np.float32), "MASK": np.ones((1, 4), np.float32)})
    code, details = status(channel, "ModelInfer", message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "broadcast" in details and "ONNXRuntimeError" not in details


@pytest.mark.parametrize("shape", [[0, 2**63 - 1], [0, 2**62], [2**62, 0], [1, -1], [9, 0], [0, 0]])
def test_client_sizes_are_checked_before_numpy(server, channel, shape):
    message = pb.ModelInferRequest(model_name="variable")
    message.inputs.append(InputTensor(name="INPUT0", datatype="FP32", shape=shape))
    message.raw_input_contents.append(b"")
    before = len(server.log())
    code, details = status(channel, "ModelInfer", message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "Traceback" not in server.log()[before:]


def test_messages_name_files_relative_to_the_repository(server, channel):
    repo = server.extra["repo"]
    absolute = str(repo.resolve())
    code, details = status(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="corrupt"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "corrupt/1/model.onnx" in details
    texts = [details]
    texts.append(status(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="nosuch"))[1])
    texts.append(status(channel, "ModelInfer", infer_request("corrupt", {"INPUT0": np.ones((1, 16), np.float32)}))[1])
    texts.append(str(call(channel, "RepositoryIndex", pb.RepositoryIndexRequest())))
    assert all(text and absolute not in text and str(repo) not in text for text in texts), texts
    assert absolute in server.log()  # the server's own log keeps them


def test_long_names_are_not_echoed_in_full(channel):
    name = "x" * 10_000
    for _ in range(5):
        code, details = status(channel, "ModelInfer", infer_request(name, {"INPUT0": np.ones((1, 16), np.float32)}))
        assert code == grpc.StatusCode.NOT_FOUND and len(details) < 300 and "10000 characters" in details
    for method, message in (
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name)),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=name)),
        ("ModelMetadata", pb.ModelMetadataRequest(name=name)),
    ):
        code, details = status(channel, method, message)
        assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), method
        assert len(details) < 300, method
    # ModelReady is a probe: as Triton, an unknown model is ready=false, not an error (so nothing is echoed).
    assert call(channel, "ModelReady", pb.ModelReadyRequest(name=name)).ready is False
