"""The TorchScript backend through a real server: scripted modules give the eager module's outputs."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ops_models import decode, linear_module, request, torchscript_model, two_output_module  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from serving import call, running_server  # noqa: E402

from tensorwire.proto import inference_pb2 as pb  # noqa: E402

FAST_STOP = ("--drain-seconds", "0")
LINEAR_IO = {
    "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [16]}],
    "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
}


def eager(module, x: np.ndarray) -> tuple[np.ndarray, ...] | np.ndarray:
    with torch.no_grad():
        out = module(torch.from_numpy(x))
    if isinstance(out, tuple):
        return tuple(o.numpy() for o in out)
    return out.numpy()


def rows(n: int, seed: int, width: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("torchscript") / "models"
    torchscript_model(repo, "ts_batched", linear_module(), {
        "max_batch_size": 8, **LINEAR_IO,
        "dynamic_batching": {"max_queue_delay_us": 2000},
        "instance_group": [{"kind": "cpu", "count": 1}],
    })
    torchscript_model(repo, "ts_unbatched", linear_module(), {
        "max_batch_size": 0,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1, 16]}],
        "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [-1, 4]}],
        "instance_group": [{"kind": "cpu"}],
    })
    torchscript_model(repo, "ts_two_outputs", two_output_module(), {
        "max_batch_size": 8,
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [16]}],
        "outputs": [{"name": "LOGITS", "datatype": "FP32", "dims": [4]},
                    {"name": "DOUBLE_SUM", "datatype": "FP32", "dims": [1]}],
        "instance_group": [{"kind": "cpu"}],
    })
    torchscript_model(repo, "ts_no_inputs", linear_module(), {
        "max_batch_size": 8, "outputs": LINEAR_IO["outputs"], "instance_group": [{"kind": "cpu"}],
    })
    return repo


@pytest.fixture(scope="module")
def server(repo):
    # ts_no_inputs fails to load on purpose: strict readiness would never report this server ready.
    with running_server(repo, *FAST_STOP, "--no-strict-readiness") as running:
        yield running


@pytest.fixture(scope="module")
def channel(server):
    with server.channel() as ch:
        yield ch


def infer(channel, model: str, x: np.ndarray, **kwargs) -> tuple[pb.ModelInferResponse, dict]:
    response = call(channel, "ModelInfer", request(model, {"INPUT0": x}, **kwargs))
    return response, decode(response)


# ---------------------------------------------------------------------- tests


def test_metadata_and_config(channel):
    metadata = call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="ts_batched"))
    assert metadata.platform == "pytorch_libtorch"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("INPUT0", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("OUTPUT0", "FP32", [-1, 4])]
    config = call(channel, "ModelConfig", pb.ModelConfigRequest(name="ts_batched")).config
    assert (config.backend, config.max_batch_size) == ("torchscript", 8)
    assert config.default_model_filename == "model.pt"
    assert [list(t.dims) for t in config.input] == [[16]]

    unbatched = call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="ts_unbatched"))
    assert [list(t.shape) for t in unbatched.inputs] == [[-1, 16]]  # no batch dimension added
    assert call(channel, "ModelConfig", pb.ModelConfigRequest(name="ts_unbatched")).config.max_batch_size == 0


@pytest.mark.parametrize("n", [1, 3, 8])
def test_batched_matches_eager(channel, n):
    module = linear_module()
    x = rows(n, seed=n)
    response, out = infer(channel, "ts_batched", x, request_id=f"b{n}")
    assert response.id == f"b{n}"
    assert out["OUTPUT0"].shape == (n, 4)
    assert out["OUTPUT0"].dtype == np.float32
    np.testing.assert_allclose(out["OUTPUT0"], eager(module, x), rtol=1e-5, atol=1e-5)


def test_batch_over_max_is_invalid(channel):
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, "ts_batched", rows(9, seed=9))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unbatched_matches_eager(channel):
    module = linear_module()
    for n in (1, 5, 20):  # the first dim is a model dim here, not a batch: no max_batch_size limit
        x = rows(n, seed=100 + n)
        _, out = infer(channel, "ts_unbatched", x)
        assert out["OUTPUT0"].shape == (n, 4)
        np.testing.assert_allclose(out["OUTPUT0"], eager(module, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(grpc.RpcError) as caught:  # rank 3 would be a batched request: refused
        call(channel, "ModelInfer", request("ts_unbatched", {"INPUT0": rows(2, 0).reshape(1, 2, 16)}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def executions(server) -> int:
    with server.channel() as ch:
        [stats] = call(ch, "ModelStatistics", pb.ModelStatisticsRequest(name="ts_batched")).model_stats
    return stats.execution_count


def test_concurrent_requests_get_their_own_rows(server):
    module = linear_module()
    inputs = [rows(1 + i % 3, seed=1000 + i) for i in range(48)]
    # Rows tagged by their request: a mix-up between batch members would show.
    for i, x in enumerate(inputs):
        x[:, 0] = i

    def one(i: int):
        with server.channel() as ch:
            return i, *infer(ch, "ts_batched", inputs[i], request_id=f"c{i}")

    before = executions(server)
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, range(len(inputs))))
    after = executions(server)
    # The requests really shared batches (otherwise this would prove nothing about splitting).
    assert after - before < len(inputs)
    for i, response, out in results:
        assert response.id == f"c{i}"
        assert out["OUTPUT0"].shape == (len(inputs[i]), 4)
        np.testing.assert_allclose(out["OUTPUT0"], eager(module, inputs[i]), rtol=1e-5, atol=1e-5)


def test_tuple_outputs_map_to_config_outputs(channel):
    module = two_output_module()
    x = rows(3, seed=7)
    logits, double_sum = eager(module, x)
    response, out = infer(channel, "ts_two_outputs", x)
    assert [t.name for t in response.outputs] == ["LOGITS", "DOUBLE_SUM"]
    assert out["LOGITS"].shape == (3, 4) and out["DOUBLE_SUM"].shape == (3, 1)
    np.testing.assert_allclose(out["LOGITS"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["DOUBLE_SUM"], double_sum, rtol=1e-5, atol=1e-5)
    # A requested subset: just the second output.
    response, out = infer(channel, "ts_two_outputs", x, outputs=["DOUBLE_SUM"])
    assert [t.name for t in response.outputs] == ["DOUBLE_SUM"]
    np.testing.assert_allclose(out["DOUBLE_SUM"], double_sum, rtol=1e-5, atol=1e-5)


def test_missing_inputs_list_fails_load_clearly(channel):
    index = call(channel, "RepositoryIndex", pb.RepositoryIndexRequest())
    [row] = [m for m in index.models if m.name == "ts_no_inputs"]
    assert row.state == "UNAVAILABLE"
    assert "inputs" in row.reason and "config.toml" in row.reason
    with pytest.raises(grpc.RpcError) as caught:
        load = pb.RepositoryModelLoadRequest(model_name="ts_no_inputs")
        call(channel, "RepositoryModelLoad", load, timeout=60)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "inputs" in caught.value.details() and "config.toml" in caught.value.details()
    assert not call(channel, "ModelReady", pb.ModelReadyRequest(name="ts_no_inputs")).ready
    # The other models keep serving.
    _, out = infer(channel, "ts_batched", rows(1, seed=3))
    assert out["OUTPUT0"].shape == (1, 4)


# ------------------------------------------------------------------------ GPU


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    repo = tmp_path_factory.mktemp("torchscript_gpu") / "models"
    torchscript_model(repo, "ts_gpu", linear_module(), {
        "max_batch_size": 8, **LINEAR_IO, "instance_group": [{"kind": "gpu", "count": 1, "gpus": [0]}],
    })
    with running_server(repo, *FAST_STOP) as running:
        yield running


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_replica_matches_eager(gpu_server):
    module = linear_module()
    with gpu_server.channel() as ch:
        for n in (1, 4, 8):
            x = rows(n, seed=200 + n)
            _, out = infer(ch, "ts_gpu", x)
            np.testing.assert_allclose(out["OUTPUT0"], eager(module, x), rtol=1e-4, atol=1e-4)
        config = call(ch, "ModelConfig", pb.ModelConfigRequest(name="ts_gpu")).config
        assert list(config.instance_group[0].gpus) == [0]
    url = f"http://127.0.0.1:{gpu_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    devices = {
        sample.labels.get("device")
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tensorwire_replica_busy_seconds_total" and sample.labels.get("model") == "ts_gpu"
    }
    assert devices == {"cuda:0"}
