"""The metrics port: only /metrics answers; process metrics, GPU metrics when a GPU is present (none here:
no series, no error), in-flight memory gauges."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from infer_helpers import infer_request
from model_factory import onnx_identity
from prometheus_client.parser import text_string_to_metric_families
from serving import call, running_server

from tensorwire.server.gpu_metrics import GpuCollector

HAS_NVIDIA_GPU = Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("metrics") / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as srv:
        yield srv


def get(server, path: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.metrics_port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def families(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


@pytest.mark.parametrize("path", ["/", "/v2/health/ready", "/v2/health/live", "/healthz", "/metrics/extra"])
def test_only_the_metrics_path_answers(server, path):
    status, body = get(server, path)
    assert status == 404 and "/metrics" in body


def test_metrics_path_answers_a_prometheus_scrape(server):
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.metrics_port}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert b"tensorwire_request_refused" in response.read()


def test_process_and_memory_budget_metrics_are_exported(server):
    with server.channel() as channel:
        call(channel, "ModelInfer", infer_request("identity", {"INPUT0": np.ones((1, 4), np.float32)}))
    found = families(get(server, "/metrics")[1])
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds", "process_max_fds"):
        assert name in found, name
    assert found["process_resident_memory_bytes"][0].value > 10 * 2**20
    # Released once gRPC has sent the answer, which can be a moment after the client has it: wait for it.
    deadline = time.monotonic() + 5
    while found["tensorwire_inflight_bytes"][0].value and time.monotonic() < deadline:
        time.sleep(0.05)
        found = families(get(server, "/metrics")[1])
    assert found["tensorwire_inflight_bytes"][0].value == 0
    assert found["tensorwire_inflight_bytes_limit"][0].value >= 256 * 2**20


@pytest.mark.skipif(HAS_NVIDIA_GPU, reason="this machine has a GPU: the absent path does not apply")
def test_without_a_gpu_there_are_no_gpu_series_and_no_error(server):
    text = get(server, "/metrics")[1]
    assert "tensorwire_gpu_" not in text
    log = server.log()
    assert "Traceback" not in log and "nvml" not in log.lower()


def test_the_gpu_collector_is_empty_without_nvml(monkeypatch):
    """No NVML package (import fails) or no driver library (init fails): nothing collected, nothing raised."""
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert list(GpuCollector().collect()) == []
    monkeypatch.delitem(sys.modules, "pynvml")
    if not HAS_NVIDIA_GPU:
        assert list(GpuCollector().collect()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVIDIA_GPU, reason="needs an NVIDIA GPU and its driver")
def test_gpu_utilization_and_memory_per_device(server):
    found = families(get(server, "/metrics")[1])
    for name in ("tensorwire_gpu_utilization", "tensorwire_gpu_memory_used_bytes", "tensorwire_gpu_memory_total_bytes"):
        assert found.get(name), name
    total = found["tensorwire_gpu_memory_total_bytes"]
    assert all(sample.value > 0 and sample.labels["uuid"] for sample in total)
    assert all(0.0 <= sample.value <= 1.0 for sample in found["tensorwire_gpu_utilization"])
