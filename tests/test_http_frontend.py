"""The HTTP/REST front-end against a real server: Triton's tritonclient.http, KServe's InferenceRESTClient and
plain HTTP requests (what curl sends): JSON and binary tensors, every datatype family, errors and their HTTP
codes, the repository and statistics endpoints, and one set of statistics shared with gRPC."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import requests
import tritonclient.http as triton_http
from client_models import bytes_echo
from infer_helpers import infer_request
from model_factory import executed_ids, onnx_add_sub, onnx_identity, sleeper_model, wait_started
from serving import RunningServer, call, running_server, wait_pending
from tritonclient.utils import InferenceServerException

from tensorwire.proto import inference_pb2 as pb

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    repo = tmp_path_factory.mktemp("http") / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8, warmup="none")
    for datatype in ("FP16", "BF16", "INT64", "BOOL", "UINT8"):
        onnx_identity(
            repo, f"identity_{datatype.lower()}", datatype=datatype, dims=[3], max_batch_size=4, warmup="none"
        )
    onnx_identity(repo, "text", datatype="BYTES", dims=[-1], max_batch_size=8, warmup="none")
    onnx_add_sub(repo, "add_sub", max_batch_size=4, warmup="none")
    onnx_identity(repo, "spare", dims=[2], max_batch_size=2, warmup="none")
    sleeper_log = sleeper_model(repo, "sleeper", max_batch_size=4)
    bytes_echo(repo)
    with running_server(repo, "--drain-seconds", "0", http=True) as srv:
        srv.extra["sleeper_log"] = sleeper_log
        yield srv


@pytest.fixture
def base(server) -> str:
    return f"http://{server.http_address}"


@pytest.fixture
def client(server) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(server.http_address, network_timeout=30)
    yield client
    client.close()


def triton_input(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def post_json(base: str, path: str, body: dict, **kwargs) -> requests.Response:
    return requests.post(
        base + path, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=30, **kwargs
    )


# ------------------------------------------------------------------ tritonclient.http


def test_triton_http_client_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity") and not client.is_model_ready("nope")
    assert "statistics" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("identity")
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["versions"] == ["1"]
    config = client.get_model_config("identity")
    assert config["max_batch_size"] == 8 and config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == [4]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_http_client_infers_fp32(client, binary):
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    result = client.infer(
        "identity",
        [triton_input("INPUT0", x, "FP32", binary)],
        outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=binary)],
        request_id="r-1",
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_http_client_bytes(client, binary):
    words = np.array([[b"alpha", "é".encode(), b""], [b"x" * 100, b"b", b"c"]], dtype=object)
    result = client.infer(
        "text",
        [triton_input("INPUT0", words, "BYTES", binary)],
        outputs=[triton_http.InferRequestedOutput("OUTPUT0", binary_data=binary)],
    )
    got = [w if isinstance(w, bytes) else w.encode() for w in result.as_numpy("OUTPUT0").ravel()]  # JSON: str
    assert got == list(words.ravel())


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_triton_http_client_half_precision_in_binary(client, datatype):
    x = np.array([[1.5, -2.25, 65504.0], [0.0, -0.0, 3.0]], dtype=np.float32)
    sent = x.astype(np.float16 if datatype == "FP16" else ml_dtypes.bfloat16)  # tritonclient's BF16 dtype
    result = client.infer(f"identity_{datatype.lower()}", [triton_input("INPUT0", sent, datatype)])
    out = result.as_numpy("OUTPUT0")
    assert out.dtype == sent.dtype
    np.testing.assert_array_equal(out.astype(np.float32), sent.astype(np.float32))
    assert np.signbit(out.astype(np.float32)[1, 1])  # -0.0 kept, bit for bit


def test_triton_http_client_output_selection_and_parameters(client):
    a, b = np.ones((1, 16), np.float32) * 3, np.ones((1, 16), np.float32)
    result = client.infer(
        "add_sub",
        [triton_input("INPUT0", a, "FP32"), triton_input("INPUT1", b, "FP32")],
        outputs=[triton_http.InferRequestedOutput("OUTPUT1")],
        priority=1,
        timeout=5_000_000,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0") is None


def test_triton_http_client_repository_and_statistics(client, server):
    index = client.get_model_repository_index()
    assert {"name": "identity", "version": "1", "state": "READY"} in index
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    client.load_model("spare")
    assert client.is_model_ready("spare")
    before = client.get_inference_statistics("identity")["model_stats"][0]
    x = np.ones((3, 4), np.float32)
    client.infer("identity", [triton_input("INPUT0", x, "FP32")])
    # the same counters whichever front-end served the request
    with server.channel() as channel:
        call(channel, "ModelInfer", infer_request("identity", {"INPUT0": np.ones((2, 4), np.float32)}))
        grpc_stats = call(channel, "ModelStatistics", pb.ModelStatisticsRequest(name="identity")).model_stats[0]
    after = client.get_inference_statistics("identity")["model_stats"][0]
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 2
    assert after["inference_count"] == grpc_stats.inference_count  # numbers, not strings, in JSON
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} >= {"identity", "text"}


def test_triton_http_client_errors(client):
    with pytest.raises(InferenceServerException) as caught:
        client.infer("nope", [triton_input("INPUT0", np.ones((1, 4), np.float32), "FP32")])
    assert caught.value.status() == "404" and "unknown model" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.infer("identity", [triton_input("INPUT0", np.ones((1, 5), np.float32), "FP32")])
    assert caught.value.status() == "400" and "expected [-1, 4]" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        client.load_model("not_in_repo")
    assert caught.value.status() == "404"


# --------------------------------------------------------- KServe's REST client


def test_kserve_rest_client(server):
    """KServe's InferenceRESTClient (v2): health, JSON and binary FP32, BYTES, a plain dict (kserve_rest_check.py,
    in a process of its own: its protobuf module cannot be imported beside tritonclient.grpc's)."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kserve_rest_check.py")), f"http://{server.http_address}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


# ------------------------------------------------------------- plain HTTP (curl)


def test_json_request_with_nested_data(base):
    body = {
        "id": "n",
        "inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [2, 4], "data": [[1, 2, 3, 4], [5, 6, 7, 8]]}],
    }
    response = post_json(base, "/v2/models/identity/infer", body)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    [output] = response.json()["outputs"]
    assert output == {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 4], "data": [1.0, 2, 3, 4, 5, 6, 7, 8]}


def test_binary_request_and_answer_by_hand(base):
    x = np.arange(6, dtype=np.int64).reshape(2, 3)
    header = json.dumps(
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "INT64", "shape": [2, 3], "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    response = requests.post(
        base + "/v2/models/identity_int64/versions/1/infer",
        data=header + x.tobytes(),
        headers={HEADER: str(len(header)), "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    answer = json.loads(response.content[:length])
    [output] = answer["outputs"]
    assert output["parameters"]["binary_data_size"] == x.nbytes and "data" not in output
    np.testing.assert_array_equal(np.frombuffer(response.content[length:], np.int64).reshape(2, 3), x)


def test_bool_and_integer_json(base):
    body = {"inputs": [{"name": "INPUT0", "datatype": "BOOL", "shape": [1, 3], "data": [True, False, True]}]}
    assert post_json(base, "/v2/models/identity_bool/infer", body).json()["outputs"][0]["data"] == [True, False, True]
    body = {"inputs": [{"name": "INPUT0", "datatype": "UINT8", "shape": [1, 3], "data": [0, 255, 300]}]}
    response = post_json(base, "/v2/models/identity_uint8/infer", body)
    assert response.status_code == 400 and "outside [0, 255]" in response.json()["error"]


def test_bytes_that_are_not_utf8_need_binary_outputs(base):
    raw = b"\xff\xfe"
    payload = struct.pack("<I", len(raw)) + raw
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "INPUT0",
                    "datatype": "BYTES",
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ]
        }
    ).encode()
    headers = {HEADER: str(len(header))}
    response = requests.post(base + "/v2/models/bytes_echo/infer", data=header + payload, headers=headers, timeout=60)
    assert response.status_code == 400 and "binary_data" in response.json()["error"]
    header_binary = json.dumps(
        {"inputs": json.loads(header)["inputs"], "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}
    ).encode()
    response = requests.post(
        base + "/v2/models/bytes_echo/infer",
        data=header_binary + payload,
        headers={HEADER: str(len(header_binary))},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.content[int(response.headers[HEADER]) :] == payload


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "text"),
    [
        ("GET", "/v2/models/nope", None, 404, "unknown model"),
        ("GET", "/v2/models/identity/versions/7", None, 404, "no version 7"),
        ("GET", "/v2/models/identity/versions/x1", None, 400, "not a version number"),
        ("GET", "/v2/models/identity/versions/x1/ready", None, 400, "not a version number"),
        ("GET", "/v2/models/identity/versions/x1", None, 400, "Triton refuses it too"),
        ("GET", "/v2/models/identity/versions/1.0", None, 400, "Triton would read it as 1"),
        ("GET", "/v2/models/identity/versions/%201/ready", None, 400, "Triton would read it as 1"),
        ("GET", "/v2/nothing/here", None, 404, "no such endpoint"),
        ("GET", "/v1/models/identity", None, 404, "/v2"),
        ("GET", "/v2/models/identity/infer", None, 405, "POST"),
        ("POST", "/v2/health/ready", b"", 405, "GET"),
        ("POST", "/v2/models/identity/infer", b"{not json", 400, "not valid JSON"),
        ("POST", "/v2/models/identity/infer", b"[1, 2]", 400, "must be a JSON object"),
        ("POST", "/v2/models/identity/infer", b'{"inputs": 3}', 400, "'inputs' must be a list"),
        (
            "POST",
            "/v2/models/identity/infer",
            b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4]}]}',
            400,
            "no data",
        ),
        (
            "POST",
            "/v2/models/identity/infer",
            b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2]}]}',
            400,
            "needs 4 values",
        ),
        (
            "POST",
            "/v2/models/identity/infer",
            b'{"inputs": [{"name": "IN", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}',
            400,
            "unknown input",
        ),
        (
            "POST",
            "/v2/models/identity/infer",
            b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],'
            b' "parameters": {"sequence_id": 5}}',
            400,
            "sequence batching",
        ),
        (
            "POST",
            "/v2/models/identity/infer",
            b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],'
            b' "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}}]}',
            400,
            "classification",
        ),
        ("POST", "/v2/repository/models/identity/load", b'{"parameters": {"config": "{}"}}', 400, "not supported"),
        ("POST", "/v2/repository/models/-dash/load", b"", 404, "invalid model name"),
    ],
)
def test_errors_have_the_v2_status_and_an_error_body(base, method, path, body, status, text):
    response = requests.request(method, base + path, data=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert text in response.json()["error"]


def test_a_compressed_body_is_refused_with_415(base):
    body = json.dumps({"inputs": []}).encode()
    response = requests.post(
        base + "/v2/models/identity/infer", data=body, headers={"Content-Encoding": "gzip"}, timeout=10
    )
    assert response.status_code == 415 and "uncompressed" in response.json()["error"]


def test_binary_sizes_that_do_not_add_up(base):
    x = np.ones((1, 4), np.float32)
    header = json.dumps(
        {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}]}
    ).encode()
    for extra, text in ((b"", "runs past the end"), (b"\0" * 4, "add up to 16")):
        body = header + x.tobytes()[: 16 - (4 if not extra else 0)] + extra
        response = requests.post(
            base + "/v2/models/identity/infer", data=body, headers={HEADER: str(len(header))}, timeout=30
        )
        assert response.status_code == 400 and text in response.json()["error"], response.text
    response = requests.post(base + "/v2/models/identity/infer", data=header, headers={HEADER: "999"}, timeout=30)
    assert response.status_code == 400 and HEADER in response.json()["error"]


def test_a_timeout_parameter_is_a_deadline(base, server):
    body = {
        "inputs": [
            {"name": "ID", "datatype": "INT64", "shape": [1, 1], "data": [1]},
            {"name": "SLEEP_MS", "datatype": "FP32", "shape": [1, 1], "data": [1500]},
        ],
        "parameters": {"timeout": 200_000},
    }
    started = time.monotonic()
    response = post_json(base, "/v2/models/sleeper/infer", body)
    assert response.status_code == 504 and "deadline" in response.json()["error"].lower()
    assert time.monotonic() - started < 1.4


def test_refusals_are_counted_like_grpc_ones(base, server):
    def refused() -> dict[tuple[str, str], float]:
        text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        counts = {}
        for line in text.splitlines():
            if line.startswith("tensorwire_request_refused_total{"):
                labels, value = line.rsplit(" ", 1)
                method = labels.split('method="')[1].split('"')[0]
                reason = labels.split('reason="')[1].split('"')[0]
                counts[(method, reason)] = float(value)
        return counts

    before = refused()
    requests.post(base + "/v2/models/identity/infer", data=b"{", timeout=10)
    requests.get(base + "/v2/models/nope/config", timeout=10)
    after = refused()
    assert after.get(("ModelInfer", "malformed"), 0) == before.get(("ModelInfer", "malformed"), 0) + 1
    assert after.get(("ModelConfig", "not_found"), 0) == before.get(("ModelConfig", "not_found"), 0) + 1


def test_the_server_keeps_serving_after_bad_requests(client):
    for garbage in (b"\0" * 100, b'{"inputs": [{"name": 1}]}', b"{}"):
        requests.post(f"http://{client._parsed_url.netloc}/v2/models/identity/infer", data=garbage, timeout=10)
    x = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(client.infer("identity", [triton_input("INPUT0", x, "FP32")]).as_numpy("OUTPUT0"), x)


def sleeper_body(ident: int, sleep_ms: float) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {"name": "ID", "datatype": "INT64", "shape": [1, 1], "data": [ident]},
                {"name": "SLEEP_MS", "datatype": "FP32", "shape": [1, 1], "data": [sleep_ms]},
            ]
        }
    ).encode()


def test_a_client_that_disconnects_cancels_its_queued_request(base, server):
    """As a cancelled gRPC call: the request leaves the queue and never runs."""
    log = server.extra["sleeper_log"]
    busy = threading.Thread(
        target=lambda: requests.post(base + "/v2/models/sleeper/infer", data=sleeper_body(101, 2500))
    )
    busy.start()
    wait_started(log, 101)  # 101 is running on the only replica
    body = sleeper_body(102, 0)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        sock.sendall(
            b"POST /v2/models/sleeper/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_pending(server, "sleeper", 1)  # 102 is queued behind 101
    busy.join(30)
    # first in, first out: had 102 stayed in the queue, it would have run before 103 is answered
    assert requests.post(base + "/v2/models/sleeper/infer", data=sleeper_body(103, 0), timeout=30).ok
    assert 101 in executed_ids(log) and 102 not in executed_ids(log)
