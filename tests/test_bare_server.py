"""The bare baseline server (loadtest/bare_server.py) is a correct v2 server: the SDK and perf_analyzer use it.

It is what tensorwire's serving overhead is measured against, so it must answer right (or the comparison
means nothing): the SDK's calls, a stream with a bad request in the middle, the errors, and perf_analyzer
unary and streaming (it reads ServerMetadata, ModelMetadata and ModelConfig, and must not ask for
statistics the server does not have).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from model_factory import onnx_add_sub, onnx_identity

from tensorwire.client import (
    InferenceClient,
    InferenceServerError,
    InvalidInputError,
    ModelNotFoundError,
    RetryPolicy,
    UnsupportedError,
)
from tensorwire.loadtest import perf_analyzer as pa
from tensorwire.loadtest.launch import serve
from tensorwire.loadtest.reference_models import write_perf_inputs


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    root = tmp_path_factory.mktemp("bare")
    repo = root / "models"
    onnx_identity(repo, "identity", dims=[16], max_batch_size=64)
    onnx_identity(repo, "unbatched", dims=[2, 3], max_batch_size=0)
    onnx_add_sub(repo, "add_sub", max_batch_size=8)
    with serve(repo, kind="bare", log_dir=root) as server:
        server.extra["root"] = root
        yield server


@pytest.fixture()
def client(bare):
    with InferenceClient(bare.address, retry=RetryPolicy.disabled(), timeout=10) as c:
        yield c


def test_metadata_and_config_describe_the_models(client):
    assert client.server_live() and client.server_ready()
    assert list(client.server_metadata().extensions) == []  # no statistics: perf_analyzer must not ask
    meta = client.model_metadata("identity")
    assert meta.versions == ["1"] and meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("INPUT0", "FP32", [-1, 16])]
    config = client.model_config("identity")
    assert config.max_batch_size == 64 and list(config.input[0].dims) == [16]
    assert not config.HasField("dynamic_batching")
    assert list(client.model_metadata("unbatched").inputs[0].shape) == [2, 3]
    assert client.model_config("unbatched").max_batch_size == 0
    assert client.model_ready("add_sub") and not client.model_ready("nope")
    with pytest.raises(UnsupportedError):
        client.model_statistics("identity")


def test_infer_answers_each_request_with_its_own_rows(client):
    x = np.arange(48, dtype=np.float32).reshape(3, 16)
    np.testing.assert_array_equal(client.infer("identity", {"INPUT0": x})["OUTPUT0"], x)
    a, b = np.ones((2, 16), np.float32), np.full((2, 16), 3, np.float32)
    out = client.infer("add_sub", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    assert list(out) == ["OUTPUT1"]
    np.testing.assert_array_equal(out["OUTPUT1"], a - b)
    u = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(client.infer("unbatched", {"INPUT0": u})["OUTPUT0"], u)


@pytest.mark.parametrize(
    ("model", "inputs", "error"),
    [
        ("nope", {"INPUT0": np.ones((1, 16), np.float32)}, ModelNotFoundError),
        ("identity", {"INPUT1": np.ones((1, 16), np.float32)}, InvalidInputError),
        ("identity", {"INPUT0": np.ones((1, 15), np.float32)}, InvalidInputError),
        ("identity", {"INPUT0": np.ones((65, 16), np.float32)}, InvalidInputError),
        ("identity", {"INPUT0": np.ones((1, 16), np.int32)}, InvalidInputError),
        ("unbatched", {"INPUT0": np.ones((1, 2, 3), np.float32)}, InvalidInputError),
    ],
)
def test_bad_requests_get_the_right_status(client, model, inputs, error):
    with pytest.raises(error):
        client.infer(model, inputs)
    assert client.infer("identity", {"INPUT0": np.ones((1, 16), np.float32)})["OUTPUT0"].shape == (1, 16)


def test_a_stream_answers_in_order_and_survives_a_bad_request(client):
    rows = [np.full((1, 16), i, np.float32) for i in range(20)]
    with client.stream("identity", max_in_flight=8) as stream:
        futures = [stream.submit({"INPUT0": r}) for r in rows[:10]]
        bad = stream.submit({"INPUT0": np.ones((1, 3), np.float32)})
        futures += [stream.submit({"INPUT0": r}) for r in rows[10:]]
        with pytest.raises(InferenceServerError, match="INPUT0"):
            bad.result(timeout=10)
        for row, future in zip(rows, futures, strict=True):
            np.testing.assert_array_equal(future.result(timeout=10)["OUTPUT0"], row)


def test_sigterm_stops_it_with_status_0(tmp_path):
    repo = tmp_path / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8)
    with serve(repo, kind="bare") as server:
        assert server.stop(signal.SIGTERM, timeout=20) == 0


def test_a_bad_repository_is_a_clear_error_at_start(tmp_path):
    (tmp_path / "models" / "empty").mkdir(parents=True)
    with (
        pytest.raises(RuntimeError, match="no <version>/model.onnx"),
        serve(tmp_path / "models", "--models", "empty", kind="bare", ready_timeout=60),
    ):
        pass


@pytest.mark.parametrize("streaming", [False, True])
def test_perf_analyzer_drives_it(perf_analyzer, bare, streaming):
    inputs = write_perf_inputs("identity", bare.extra["root"] / "perf_inputs" / "identity.json")
    spec = pa.PerfAnalyzerRun(
        "identity",
        4,
        streaming=streaming,
        measurement_interval_ms=500,
        stability_pct=1000,
        retry_stability_pct=10000,
        max_trials=6,
    )
    row = pa.run(spec, bare, inputs, bare.extra["root"] / "pa")
    assert "error" not in row, row
    assert row["throughput_rps"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
    assert row["server_cpu_cores"] > 0 and row["server_cpu_us_per_request"] > 0
    # no statistics extension: neither perf_analyzer's server columns nor an average batch
    assert row["server_queue_us"] is None and row["server_avg_batch"] is None
    assert "Traceback" not in bare.log()


def test_the_baseline_shares_no_code_with_the_server_it_is_compared_with():
    code = "import json, sys, tensorwire.loadtest.bare_server; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert not [m for m in json.loads(out.stdout) if m.startswith("tensorwire.server")]
