"""Operations: health, reflection, metrics, size limits, hot reload, broken models,
path traversal, the serve CLI and version policies -- all through a real server over real gRPC."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from model_factory import onnx_identity, write_config
from ops_models import add_version_atomically, decode, garbage_onnx, request, snapshot
from polling import wait_for
from prometheus_client.parser import text_string_to_metric_families
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb

SERVICE = "inference.GRPCInferenceService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
FAST_STOP = ("--drain-seconds", "0")  # nothing here tests draining; stop quickly


def _identity_request(model: str, rows: int = 1, width: int = 16, value: float = 1.0, **kwargs):
    return request(model, {"INPUT0": np.full((rows, width), value, np.float32)}, **kwargs)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ops_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ops")
    repo = root / "models"
    onnx_identity(repo, "identity", dims=[16], max_batch_size=8)
    onnx_identity(repo, "good", dims=[16], max_batch_size=8)
    onnx_identity(repo, "health_model", dims=[16], max_batch_size=8)
    onnx_identity(repo, "metered", dims=[4], max_batch_size=8)
    onnx_identity(repo, "stable", dims=[16], max_batch_size=8)
    # Broken: a version folder whose model.onnx is garbage.
    garbage_onnx(repo, "bad_onnx")
    # Broken: an invalid config.toml (unknown key) next to a valid model file.
    onnx_identity(repo, "bad_config", dims=[16], max_batch_size=8)
    write_config(repo, "bad_config", {"backend": "onnxruntime", "max_batch_size": 8, "max_batch": 4})
    # Partly broken: version 1 fine, version 2 garbage, both selected.
    onnx_identity(repo, "partial", dims=[16], max_batch_size=8, version_policy={"all": True})
    garbage_onnx(repo, "partial", version=2, version_policy={"all": True})
    # Version policies.
    for version in (1, 2, 3):
        onnx_identity(repo, "all_versions", dims=[16], max_batch_size=8, version=version, version_policy={"all": True})
        onnx_identity(
            repo,
            "specific_versions",
            dims=[16],
            max_batch_size=8,
            version=version,
            version_policy={"specific": [1, 3]},
        )
    # A valid model *outside* the repository: the target of a path-traversal load.
    onnx_identity(root, "victim", dims=[16], max_batch_size=8)
    return repo


@pytest.fixture(scope="module")
def ops_server(ops_repo):
    # Broken models on purpose: strict readiness (the default) would never report this server ready.
    with running_server(ops_repo, *FAST_STOP, "--no-strict-readiness") as server:
        yield server


@pytest.fixture(scope="module")
def channel(ops_server):
    with ops_server.channel() as ch:
        yield ch


def _load(channel, name: str) -> pb.RepositoryModelLoadResponse:
    return call(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=name), timeout=60)


# ------------------------------------------------------------ (a) health


def _wait_health(stub, service: str, want: int, timeout: float = 3.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
        if status == want or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_health_server_service_and_models(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert _wait_health(stub, "", SERVING) == SERVING
    assert _wait_health(stub, SERVICE, SERVING) == SERVING
    for model in ("good", "health_model", "metered"):
        assert _wait_health(stub, model, SERVING) == SERVING, model
    assert _wait_health(stub, "bad_onnx", NOT_SERVING) == NOT_SERVING
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=2)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_follows_unload_and_load(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    assert _wait_health(stub, "health_model", SERVING) == SERVING
    call(channel, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="health_model"))
    assert _wait_health(stub, "health_model", NOT_SERVING) == NOT_SERVING
    assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == SERVING
    _load(channel, "health_model")
    assert _wait_health(stub, "health_model", SERVING) == SERVING


# --------------------------------------------------------- (b) reflection


def _reflect(channel, **kwargs) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(**kwargs)])
    [response] = list(stub.ServerReflectionInfo(requests, timeout=5))
    return response


def test_reflection_lists_services(channel):
    response = _reflect(channel, list_services="")
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_reflection_file_containing_service(channel):
    response = _reflect(channel, file_containing_symbol=SERVICE)
    assert not response.HasField("error_response"), response.error_response
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    [file] = [f for f in files if any(s.name == "GRPCInferenceService" for s in f.service)]
    assert file.package == "inference"
    [service] = file.service
    methods = {m.name: m for m in service.method}
    assert {
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    } <= set(methods)
    assert methods["ModelInfer"].input_type == ".inference.ModelInferRequest"
    assert methods["ModelStreamInfer"].client_streaming and methods["ModelStreamInfer"].server_streaming
    assert "tensorwire" not in str(file)  # fully re-packaged: no reference to our private package

    health = _reflect(channel, file_containing_symbol="grpc.health.v1.Health")
    [health_file] = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in health.file_descriptor_response.file_descriptor_proto
    ]
    assert health_file.package == "grpc.health.v1"
    missing = _reflect(channel, file_containing_symbol="inference.NoSuchThing")
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_descriptors_match_our_messages(ops_server):
    """A reflection client (what grpcurl does) sees the standard names with our field numbers."""
    with ops_server.channel() as ch:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(ch))
        method = pool.FindServiceByName(SERVICE).methods_by_name["ModelInfer"]
        assert method.input_type.full_name == "inference.ModelInferRequest"
        assert method.output_type.full_name == "inference.ModelInferResponse"
        for ours in (
            pb.ModelInferRequest,
            pb.ModelInferResponse,
            pb.InferParameter,
            pb.ModelStreamInferResponse,
        ):
            theirs = pool.FindMessageTypeByName(f"inference.{ours.DESCRIPTOR.name}")
            assert {(f.name, f.number) for f in theirs.fields} == {(f.name, f.number) for f in ours.DESCRIPTOR.fields}


# ------------------------------------------------------------ (c) metrics


def _scrape(server) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def _samples(text: str, model: str, version: str = "1") -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.labels.get("version") == version:
                extra = {k: v for k, v in sample.labels.items() if k not in ("model", "version")}
                key = sample.name + ("" if not extra else str(sorted(extra.items())))
                found[key] = sample.value
    return found


def test_prometheus_metrics(ops_server, channel):
    rows = [1, 2, 3, 1, 1]
    for n in rows:
        call(channel, "ModelInfer", _identity_request("metered", rows=n, width=4))
    text = _scrape(ops_server)
    for name in (
        "tensorwire_request_success_total",
        "tensorwire_inference_count_total",
        "tensorwire_execution_count_total",
        "tensorwire_batch_size_count",
        "tensorwire_queue_duration_seconds_count",
    ):
        assert f'{name}{{model="metered",version="1"}}' in text, name
    assert "# TYPE tensorwire_batch_size histogram" in text
    assert "# TYPE tensorwire_queue_duration_seconds histogram" in text

    s = _samples(text, "metered")
    assert s["tensorwire_request_success_total"] == len(rows)
    assert s["tensorwire_inference_count_total"] == sum(rows)
    executions = s["tensorwire_execution_count_total"]
    assert 1 <= executions <= len(rows)
    assert s["tensorwire_batch_size_count"] == executions
    assert s["tensorwire_batch_size_sum"] == sum(rows)
    assert s["tensorwire_queue_duration_seconds_count"] == len(rows)
    assert s["tensorwire_queue_duration_seconds_sum"] >= 0
    assert s["tensorwire_batch_size_bucket[('le', '+Inf')]"] == executions
    assert s["tensorwire_queue_duration_seconds_bucket[('le', '+Inf')]"] == len(rows)
    assert s["tensorwire_batch_size_bucket[('le', '1.0')]"] <= executions
    # Each model version has its own series.
    assert "tensorwire_request_success_total" not in _samples(text, "metered", "2")


# ------------------------------------------------------- (d) message size


def test_message_size_limit(tmp_path_factory):
    repo = tmp_path_factory.mktemp("limits") / "models"
    onnx_identity(repo, "wide", dims=[-1], max_batch_size=8)
    with running_server(repo, "--max-message-bytes", "4096", *FAST_STOP) as server, server.channel() as ch:
        small = np.arange(16, dtype=np.float32).reshape(1, 16)
        big = np.zeros((1, 16 * 1024), np.float32)  # 64 KiB of tensor data
        out = decode(call(ch, "ModelInfer", request("wide", {"INPUT0": small})))["OUTPUT0"]
        np.testing.assert_array_equal(out, small)
        with pytest.raises(grpc.RpcError) as caught:
            call(ch, "ModelInfer", request("wide", {"INPUT0": big}))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for _ in range(3):  # still serving small requests on the same channel
            out = decode(call(ch, "ModelInfer", request("wide", {"INPUT0": small})))["OUTPUT0"]
            np.testing.assert_array_equal(out, small)


# ---------------------------------------------------------- (e) hot reload


def test_hot_reload_zero_failures(ops_server, ops_repo, channel):
    results: list[tuple[float, str, bool]] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def traffic(worker: int) -> None:
        with ops_server.channel() as ch:
            i = 0
            while not stop.is_set():
                x = np.full((1, 16), worker * 100_000 + i, np.float32)
                sent = time.monotonic()
                try:
                    message = request("identity", {"INPUT0": x}, request_id=f"{worker}-{i}")
                    response = call(ch, "ModelInfer", message)
                except grpc.RpcError as err:
                    with lock:
                        errors.append(err)
                else:
                    ok = response.id == f"{worker}-{i}" and np.array_equal(decode(response)["OUTPUT0"], x)
                    with lock:
                        results.append((sent, response.model_version, ok))
                i += 1

    def count(after: float = 0.0) -> int:
        with lock:
            return sum(1 for sent, _, _ in results if sent > after)

    threads = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        while count() < 100 and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
        add_version_atomically(ops_repo, "identity", onnx_identity, 2, dims=[16], max_batch_size=8)
        loading = time.monotonic()
        _load(channel, "identity")
        loaded = time.monotonic()
        while (count(loaded) < 100 or count() < 300) and not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)

    assert not errors, f"{len(errors)} failed requests during the reload, first: {errors[0]!r}"
    assert len(results) >= 300
    assert all(ok for _, _, ok in results), "a response carried the wrong id or data"
    before = {version for sent, version, _ in results if sent <= loaded}
    after = {version for sent, version, _ in results if sent > loaded}
    assert "1" in before
    assert any(loading <= sent <= loaded for sent, _, _ in results), "no request overlapped the reload"
    assert after == {"2"}
    metadata = call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="identity"))
    assert list(metadata.versions) == ["2"]  # latest = 1 policy: version 1 retired
    response = call(channel, "ModelInfer", _identity_request("identity"))
    assert response.model_version == "2"
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, "ModelInfer", _identity_request("identity", version="1"))
    assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)


def test_failed_reload_keeps_the_serving_version(ops_repo, channel):
    """A broken new version never takes down the one serving; the index says why it is not served."""
    garbage_onnx(ops_repo, "stable", version=2)
    with pytest.raises(grpc.RpcError) as caught:
        _load(channel, "stable")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    bad_file = "stable/2/model.onnx"  # named relative to the repository, never by its absolute path
    assert bad_file in caught.value.details() and str(ops_repo) not in caught.value.details()
    assert call(channel, "ModelReady", pb.ModelReadyRequest(name="stable")).ready
    response = call(channel, "ModelInfer", _identity_request("stable", value=2.0))
    assert response.model_version == "1"
    np.testing.assert_array_equal(decode(response)["OUTPUT0"], np.full((1, 16), 2.0, np.float32))
    index = _index(channel)
    assert index[("stable", "1")] == ("READY", "")
    state, reason = index[("stable", "2")]
    assert state == "UNAVAILABLE" and bad_file in reason and str(ops_repo) not in reason


def test_poll_reloads_changed_model(tmp_path_factory):
    repo = tmp_path_factory.mktemp("poll") / "models"
    onnx_identity(repo, "polled", dims=[16], max_batch_size=8)
    onnx_identity(repo, "doomed", dims=[16], max_batch_size=8)
    onnx_identity(repo, "fixable", dims=[16], max_batch_size=8)
    write_config(repo, "fixable", {"backend": "onnxruntime", "max_batch_size": 8, "max_batch": 4})

    def versions(name: str) -> list[str]:
        return list(call(ch, "ModelMetadata", pb.ModelMetadataRequest(name=name)).versions)

    def ready(name: str) -> bool:
        return call(ch, "ModelReady", pb.ModelReadyRequest(name=name)).ready

    with running_server(repo, "--poll", "0.5", *FAST_STOP, "--no-strict-readiness") as server, server.channel() as ch:
        assert call(ch, "ModelInfer", _identity_request("polled")).model_version == "1"
        assert not ready("fixable")
        # A new version appears; a model folder disappears; a broken config is fixed.
        add_version_atomically(repo, "polled", onnx_identity, 2, dims=[16], max_batch_size=8)
        shutil.rmtree(repo / "doomed")
        write_config(repo, "fixable", {"backend": "onnxruntime", "max_batch_size": 8})

        assert wait_for(lambda: versions("polled") == ["2"]), server.log()
        assert call(ch, "ModelInfer", _identity_request("polled")).model_version == "2"
        assert wait_for(lambda: not ready("doomed")), server.log()
        assert wait_for(lambda: ready("fixable")), server.log()
        assert call(ch, "ModelInfer", _identity_request("fixable")).model_version == "1"


# ------------------------------------------------------- (f) broken models


def _index(channel) -> dict[tuple[str, str], tuple[str, str]]:
    response = call(channel, "RepositoryIndex", pb.RepositoryIndexRequest())
    return {(m.name, m.version): (m.state, m.reason) for m in response.models}


def test_broken_models_do_not_stop_the_server(ops_repo, channel):
    out = decode(call(channel, "ModelInfer", _identity_request("good", value=3.0)))["OUTPUT0"]
    np.testing.assert_array_equal(out, np.full((1, 16), 3.0, np.float32))
    index = _index(channel)

    state, reason = index[("bad_onnx", "")]
    assert state == "UNAVAILABLE"
    assert "bad_onnx/1/model.onnx" in reason and str(ops_repo) not in reason

    state, reason = index[("bad_config", "")]
    assert state == "UNAVAILABLE"
    assert "config.toml" in reason and "max_batch" in reason and "unknown key" in reason

    assert index[("partial", "1")][0] == "READY"
    state, reason = index[("partial", "2")]
    assert state == "UNAVAILABLE"
    assert "partial/2/model.onnx" in reason and str(ops_repo) not in reason

    for name in ("bad_onnx", "bad_config"):
        assert not call(channel, "ModelReady", pb.ModelReadyRequest(name=name)).ready
        with pytest.raises(grpc.RpcError) as caught:
            call(channel, "ModelInfer", _identity_request(name))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert name in caught.value.details()
    assert call(channel, "ModelInfer", _identity_request("partial")).model_version == "1"
    assert call(channel, "ServerReady", pb.ServerReadyRequest()).ready


def test_loading_a_broken_model_explains_and_keeps_serving(ops_repo, channel):
    with pytest.raises(grpc.RpcError) as caught:
        _load(channel, "bad_config")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "config.toml" in caught.value.details() and "max_batch" in caught.value.details()

    with pytest.raises(grpc.RpcError) as caught:
        _load(channel, "bad_onnx")
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "bad_onnx/1/model.onnx" in caught.value.details() and str(ops_repo) not in caught.value.details()

    out = decode(call(channel, "ModelInfer", _identity_request("good", value=5.0)))["OUTPUT0"]
    np.testing.assert_array_equal(out, np.full((1, 16), 5.0, np.float32))
    assert call(channel, "ServerReady", pb.ServerReadyRequest()).ready
    assert _index(channel)[("bad_config", "")][0] == "UNAVAILABLE"


# ------------------------------------------------------ (g) path traversal


@pytest.mark.parametrize("name", ["../etc", "../victim", "..", ".", "/etc", "good/../../victim", "a/b", ""])
def test_load_refuses_path_traversal(ops_repo, channel, name):
    root = ops_repo.parent
    before_files, before_index = snapshot(root), _index(channel)
    for method, message in (
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(channel, method, message(model_name=name), timeout=30)
        assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), method
    assert snapshot(root) == before_files
    after_index = _index(channel)
    assert after_index == before_index
    assert not any("victim" in model for model, _ in after_index)


# ----------------------------------------------------------- (h) serve CLI


def test_serve_help_lists_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for option in (
        "--repo",
        "--host",
        "--grpc-port",
        "--metrics-port",
        "--max-message-bytes",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--auth-token-file",
        "--drain-seconds",
        "--grace-seconds",
        "--poll",
        "--strict-readiness",
        "--no-strict-readiness",
        "--log-level",
    ):
        assert option in result.stdout, option

    from tensorwire.server.cli import build_parser

    for action in build_parser()._actions:
        for option in action.option_strings:
            assert option in result.stdout, option


# ------------------------------------------------------ (i) version policy


def test_version_policy_all(channel):
    metadata = call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="all_versions"))
    assert list(metadata.versions) == ["1", "2", "3"]
    for version in ("1", "2", "3"):
        assert call(channel, "ModelReady", pb.ModelReadyRequest(name="all_versions", version=version)).ready
        response = call(channel, "ModelInfer", _identity_request("all_versions", version=version))
        assert response.model_version == version
    assert call(channel, "ModelInfer", _identity_request("all_versions")).model_version == "3"
    config = call(channel, "ModelConfig", pb.ModelConfigRequest(name="all_versions")).config
    assert config.version_policy.HasField("all")


def test_version_policy_specific(channel):
    metadata = call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="specific_versions"))
    assert list(metadata.versions) == ["1", "3"]
    for version in ("1", "3"):
        response = call(channel, "ModelInfer", _identity_request("specific_versions", version=version))
        assert response.model_version == version
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, "ModelInfer", _identity_request("specific_versions", version="2"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Triton's answer for a version that does not exist: ready=false, not an error
    assert not call(channel, "ModelReady", pb.ModelReadyRequest(name="specific_versions", version="2")).ready
    assert call(channel, "ModelInfer", _identity_request("specific_versions")).model_version == "3"
    config = call(channel, "ModelConfig", pb.ModelConfigRequest(name="specific_versions")).config
    assert list(config.version_policy.specific.versions) == [1, 3]


@pytest.mark.parametrize(
    "version, triton",
    [
        ("abc", "Triton refuses it too"),
        ("-1", "Triton refuses it too"),
        ("1.0", "Triton would read it as 1"),
        (" 1", "Triton would read it as 1"),
        ("+2", "Triton would read it as 2"),
        ("\u00b2", "Triton refuses it too"),
        ("\u0661", "Triton refuses it too"),
        ("9" * 30, "Triton refuses it too"),
    ],
)
def test_a_version_that_is_not_a_number_is_invalid_argument(channel, version, triton):
    """Only ASCII decimal int64 versions exist; '²' or Arabic-Indic '١' must not crash or alias version 1.
    Triton (C++ ``std::stol``) answers INVALID_ARGUMENT for '-1' and non-numbers too, ModelReady included,
    and reads a leading number (' 1', '1.0', '+2'): the message says which."""
    for method, message in (
        ("ModelInfer", _identity_request("good", version=version)),
        ("ModelReady", pb.ModelReadyRequest(name="good", version=version)),
        ("ModelMetadata", pb.ModelMetadataRequest(name="good", version=version)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(channel, method, message)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, caught.value.details())
        assert "not a version number" in caught.value.details() and triton in caught.value.details()


@pytest.mark.parametrize("version", ["0", "7", "9" * 18])
def test_a_version_that_does_not_exist_is_not_found_and_not_ready(channel, version):
    for method, message in (
        ("ModelInfer", _identity_request("good", version=version)),
        ("ModelMetadata", pb.ModelMetadataRequest(name="good", version=version)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(channel, method, message)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND, (method, caught.value.details())
    assert not call(channel, "ModelReady", pb.ModelReadyRequest(name="good", version=version)).ready
