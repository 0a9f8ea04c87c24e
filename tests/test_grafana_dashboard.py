"""The Grafana dashboard (deploy/grafana/) queries only what a real server exports.

Every metric a panel's PromQL names must be in a real scrape of a real server that served, failed and
refused requests; the labels a query groups or filters by must be on those series (or be the target
labels Prometheus adds: job, instance). GPU series exist only where NVML finds a GPU: the GPU collector's
families (``gpu_metrics.FAMILIES``) are checked on a GPU machine and excused elsewhere, and nothing else is.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from infer_helpers import infer_request
from model_factory import onnx_identity
from prometheus_client.parser import text_string_to_metric_families
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb
from tensorwire.server import gpu_metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "tensorwire-dashboard.json"
HAS_NVIDIA_GPU = Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())
METRIC = re.compile(r"\b((?:tensorwire|process)_[a-z0-9_]+)\b")
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")
#: labels Prometheus attaches to every scraped series (not in the exposition itself), and histogram buckets'
TARGET_LABELS = {"job", "instance", "le"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    return [p for p in board["panels"] if p["type"] != "row"]


def expressions(board: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def labels_used(expr: str) -> set[str]:
    used = set()
    for group in GROUPING.findall(expr):
        used |= {name.strip() for name in group.split(",") if name.strip()}
    for matchers in MATCHERS.findall(expr):
        used |= {m.split("=")[0].strip(" !~") for m in matchers.split(",") if "=" in m}
    used |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr))
    return used


def test_the_dashboard_is_grafana_json_with_the_panels_asked_for():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
    titles = " | ".join(p["title"].lower() for p in panels(board))
    for wanted in (
        "request rate",
        "errors by reason",
        "percentiles",
        "queue vs compute",
        "batch size distribution",
        "replica busy",
        "cpu",
        "resident memory",
        "gpu utilization",
        "gpu memory",
    ):
        assert wanted in titles, wanted


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> dict[str, set[str]]:
    """{sample name: label names} of a real server's /metrics after successes, failures and refusals."""
    repo = tmp_path_factory.mktemp("dash") / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8, warmup="none")
    with running_server(repo, "--drain-seconds", "0", http=True) as server:
        with server.channel() as channel:
            for rows in (1, 2, 3):
                call(channel, "ModelInfer", infer_request("identity", {"INPUT0": np.ones((rows, 4), np.float32)}))
            with pytest.raises(grpc.RpcError):  # a failure under the version: wrong shape
                call(channel, "ModelInfer", infer_request("identity", {"INPUT0": np.ones((1, 5), np.float32)}))
            with pytest.raises(grpc.RpcError):  # a refusal: unknown model
                call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="nope"))
        body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        assert requests.post(f"http://{server.http_address}/v2/models/identity/infer", json=body, timeout=10).ok
        text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    found: dict[str, set[str]] = defaultdict(set)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] |= set(sample.labels)
    return found


def test_every_metric_the_dashboard_queries_is_exported(scrape):
    names = {name for expr in expressions(dashboard()) for name in METRIC.findall(expr)}
    gpu = {name for name in names if name.startswith("tensorwire_gpu_")}
    assert gpu <= set(gpu_metrics.FAMILIES), (
        f"GPU series the collector does not export: {gpu - set(gpu_metrics.FAMILIES)}"
    )
    missing = sorted(name for name in names - gpu if name not in scrape)
    assert not missing, f"the dashboard queries series a real server does not export: {missing}"
    if HAS_NVIDIA_GPU:
        assert not sorted(gpu - set(scrape)), "GPU panels query series this GPU machine does not export"


def test_every_label_the_dashboard_uses_is_on_its_series(scrape):
    for expr in expressions(dashboard()):
        metrics = [name for name in METRIC.findall(expr) if name in scrape]
        if not metrics:  # GPU-only expressions on a machine without a GPU
            continue
        available = set().union(*(scrape[name] for name in metrics)) | TARGET_LABELS
        unknown = labels_used(expr) - available
        assert not unknown, f"{expr}: labels {sorted(unknown)} are not on {metrics}"
