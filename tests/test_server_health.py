"""Liveness and readiness as Kubernetes probes see them, on both transports.

Live = the process serves requests, also while models load and while it drains (a liveness probe must not
restart a busy pod); ready = the start-up load is done, the models are READY and the server is not draining.
gRPC: health service "" is liveness, "inference.GRPCInferenceService" readiness, each model's name that
model. HTTP: /v2/health/live and /v2/health/ready (200 or 400), also over HTTPS when TLS is on, where
Kubernetes' httpGet probe (scheme HTTPS, no client certificate, no token) must still reach them.
"""

from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest
import requests
from client_models import make_certificates
from grpc_health.v1 import health_pb2, health_pb2_grpc
from infer_helpers import infer_request, sleeper_request
from model_factory import onnx_identity, sleeper_model
from polling import wait_for
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import SERVICE_NAME

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_health(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def http_status(server, path: str) -> int:
    return requests.get(f"http://{server.http_address}{path}", timeout=5).status_code


def up(predicate, timeout_s: float = 60.0) -> bool:
    """``wait_for`` a server state; a refused connection or a failing call counts as not there yet."""
    return wait_for(predicate, timeout_s, interval_s=0.05, ignore=(grpc.RpcError, requests.ConnectionError))


def test_live_but_not_ready_while_a_model_loads(tmp_path):
    repo = tmp_path / "models"
    sleeper_model(repo, "slow", init_s=8.0)
    onnx_identity(repo, "fast", dims=[4], max_batch_size=4, warmup="none")
    with running_server(repo, "--drain-seconds", "0", http=True, wait=False) as server:
        with server.channel() as channel:
            assert up(lambda: call(channel, "ServerLive", pb.ServerLiveRequest(), timeout=2).live), "gRPC up"
            assert up(lambda: http_status(server, "/v2/health/live") == 200), "HTTP up"
            # loading: live on both transports, not ready on either
            assert grpc_health(channel, "") == SERVING
            assert grpc_health(channel, SERVICE_NAME) == NOT_SERVING
            assert grpc_health(channel, "slow") == NOT_SERVING
            assert call(channel, "ServerReady", pb.ServerReadyRequest()).ready is False
            assert http_status(server, "/v2/health/ready") == 400
            assert http_status(server, "/v2/models/slow/ready") == 400
            # models load one at a time, in name order: "fast" serves while "slow" is still loading
            assert up(lambda: grpc_health(channel, "fast") == SERVING), "fast model SERVING"
            x = np.ones((1, 4), np.float32)
            call(channel, "ModelInfer", infer_request("fast", {"INPUT0": x}))
            assert server.process.poll() is None
            assert up(lambda: grpc_health(channel, SERVICE_NAME) == SERVING), "ready"
            assert http_status(server, "/v2/health/ready") == 200
            assert grpc_health(channel, "") == SERVING and grpc_health(channel, "slow") == SERVING


def test_live_but_not_ready_while_draining(tmp_path):
    repo = tmp_path / "models"
    sleeper_model(repo, max_batch_size=2)
    with running_server(repo, "--drain-seconds", "3", "--grace-seconds", "10", http=True) as server:
        with server.channel() as channel:
            assert grpc_health(channel, SERVICE_NAME) == SERVING
            server.process.send_signal(signal.SIGTERM)
            assert up(lambda: grpc_health(channel, SERVICE_NAME) == NOT_SERVING, 2.0), "readiness to flip"
            # within the drain window: live, not ready, still serving on both transports
            assert grpc_health(channel, "") == SERVING
            assert grpc_health(channel, "sleeper") == NOT_SERVING
            assert http_status(server, "/v2/health/live") == 200
            assert http_status(server, "/v2/health/ready") == 400
            assert call(channel, "ServerLive", pb.ServerLiveRequest()).live is True
            assert call(channel, "ModelInfer", sleeper_request(7), timeout=10).id == "7"
            body = {
                "inputs": [
                    {"name": "ID", "datatype": "INT64", "shape": [1, 1], "data": [8]},
                    {"name": "SLEEP_MS", "datatype": "FP32", "shape": [1, 1], "data": [0]},
                ]
            }
            answer = requests.post(f"http://{server.http_address}/v2/models/sleeper/infer", json=body, timeout=10)
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [8]
        assert server.process.wait(30) == 0


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_probes_work_with_mutual_tls(tmp_path, certs):
    """With mutual TLS on, the HTTPS health endpoints answer a probe without a client certificate (as
    Kubernetes' httpGet with scheme HTTPS sends); every other path needs one, gRPC needs one to connect."""
    repo = tmp_path / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=4, warmup="none")
    tls = ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-client-ca", str(certs.ca)]
    with running_server(repo, *tls, "--drain-seconds", "0", http=True, wait=False) as server:
        base = f"https://localhost:{server.http_port}"
        assert up(lambda: requests.get(base + "/v2/health/ready", verify=str(certs.ca), timeout=5).ok, 90), "ready"
        # what the kubelet does: HTTPS without verifying the server and without a client certificate
        assert requests.get(base + "/v2/health/live", verify=False, timeout=5).status_code == 200
        refused = requests.get(base + "/v2/models/identity", verify=str(certs.ca), timeout=5)
        assert refused.status_code == 401 and "client certificate" in refused.json()["error"]
        client_cert = (str(certs.client_cert), str(certs.client_key))
        meta = requests.get(base + "/v2/models/identity", verify=str(certs.ca), cert=client_cert, timeout=5)
        assert meta.status_code == 200 and meta.json()["name"] == "identity"
        with pytest.raises(requests.exceptions.SSLError):  # a client trusting another CA refuses the server
            requests.get(f"https://localhost:{server.http_port}/v2", verify=str(certs.other_ca), timeout=5)
        assert "level=ERROR" not in server.log()
