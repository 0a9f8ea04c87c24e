"""Every row of README's error table: the right status, a message that says what to change, nothing else breaks."""

from __future__ import annotations

import struct
import threading
import time

import grpc
import numpy as np
import pytest
from infer_helpers import InputTensor, infer_request, outputs_of, sleeper_request
from model_factory import executed_ids, onnx_add_sub, onnx_identity, sleeper_model, wait_started
from serving import call, running_server, wait_pending

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

OK = np.ones((1, 16), np.float32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    onnx_add_sub(repo, max_batch_size=4)
    onnx_identity(repo, name="text", datatype="BYTES", dims=[-1], max_batch_size=8)
    sleeper_model(repo, max_batch_size=1, dynamic_batching={"max_queue_size": 2})
    sleeper_model(repo, name="batchy", max_batch_size=8, dynamic_batching={"max_queue_delay_us": 0})
    with running_server(repo) as srv:
        srv.extra["repo"] = repo
        yield srv


def status_of(channel, request):
    with pytest.raises(grpc.RpcError) as err:
        call(channel, "ModelInfer", request)
    return err.value.code(), err.value.details()


def add_sub(**overrides):
    inputs = {"INPUT0": OK, "INPUT1": OK}
    inputs.update(overrides)
    return infer_request("add_sub", inputs)


def test_unknown_model_and_version_are_not_found(server):
    with server.channel() as channel:
        code, details = status_of(channel, infer_request("nope", {"INPUT0": OK}))
        assert code == grpc.StatusCode.NOT_FOUND and "nope" in details
        code, details = status_of(channel, infer_request("add_sub", {"INPUT0": OK, "INPUT1": OK}, version="7"))
        assert code == grpc.StatusCode.NOT_FOUND and "version 7" in details
        with pytest.raises(grpc.RpcError) as err:
            call(channel, "ModelMetadata", pb.ModelMetadataRequest(name="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: infer_request("add_sub", {"INPUT0": OK, "WRONG": OK}), "unknown input 'WRONG'"),
        (lambda: add_sub(INPUT1=np.ones((1, 16), np.float64)), "datatype FP64, expected FP32"),
        (lambda: add_sub(INPUT1=np.ones((1, 15), np.float32)), "expected [-1, 16]"),
        (lambda: add_sub(INPUT0=np.ones((1, 1, 16), np.float32)), "expected [-1, 16]"),
        (
            lambda: add_sub(INPUT0=np.ones((5, 16), np.float32), INPUT1=np.ones((5, 16), np.float32)),
            "exceeds the model's max_batch_size 4",
        ),
        (lambda: add_sub(INPUT1=np.ones((2, 16), np.float32)), "disagree on the batch dimension"),
        (lambda: infer_request("add_sub", {"INPUT0": OK}), "missing inputs ['INPUT1']"),
    ],
    ids=[
        "unknown-input",
        "wrong-datatype",
        "wrong-shape",
        "wrong-rank",
        "batch-over-max",
        "batch-mismatch",
        "missing-input",
    ],
)
def test_invalid_inputs_are_invalid_argument_with_a_useful_message(server, make, expected):
    with server.channel() as channel:
        code, details = status_of(channel, make())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details


def test_wrong_byte_size_is_invalid_argument(server):
    request = add_sub()
    request.raw_input_contents[1] = request.raw_input_contents[1][:-4]
    with server.channel() as channel:
        code, details = status_of(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "INPUT1" in details and "needs 64 bytes" in details and "got 60" in details


def test_raw_contents_count_mismatch_is_invalid_argument(server):
    request = add_sub()
    del request.raw_input_contents[1]
    with server.channel() as channel:
        code, details = status_of(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one per input" in details


def test_malformed_bytes_is_invalid_argument_and_well_formed_bytes_work(server):
    good = np.array([["héllo".encode(), b"", b"\x00z"]], dtype=object)
    with server.channel() as channel:
        response = call(channel, "ModelInfer", infer_request("text", {"INPUT0": good}))
        np.testing.assert_array_equal(outputs_of(response)["OUTPUT0"], good)
        bad = pb.ModelInferRequest(model_name="text")
        bad.inputs.append(InputTensor(name="INPUT0", datatype="BYTES", shape=[1, 2]))
        bad.raw_input_contents.append(struct.pack("<I", 3) + b"abc" + struct.pack("<I", 99) + b"short")
        code, details = status_of(channel, bad)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "declares 99 bytes" in details


def test_parameter_without_a_value_is_invalid_argument(server):
    request = add_sub()
    request.parameters["mystery"].CopyFrom(pb.InferParameter())
    with server.channel() as channel:
        code, details = status_of(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "mystery" in details


def test_typed_contents_are_accepted(server):
    request = pb.ModelInferRequest(model_name="add_sub")
    for name in ("INPUT0", "INPUT1"):
        tensor = InputTensor(name=name, datatype="FP32", shape=[1, 16])
        tensor.contents.fp32_contents.extend([1.5] * 16)
        request.inputs.append(tensor)
    with server.channel() as channel:
        out = outputs_of(call(channel, "ModelInfer", request))
    assert (out["OUTPUT0"] == 3.0).all()


def test_unknown_requested_output_is_invalid_argument(server):
    request = infer_request("add_sub", {"INPUT0": OK, "INPUT1": OK}, outputs=["OUTPUT9"])
    with server.channel() as channel:
        code, details = status_of(channel, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "OUTPUT9" in details


def test_full_queue_is_resource_exhausted_with_pushback_and_queued_work_completes(server):
    log = server.extra["repo"] / "sleeper.calls"
    m = METHODS["ModelInfer"]
    with server.channel() as channel:
        stub = channel.unary_unary(
            m.path,
            request_serializer=m.request.SerializeToString,
            response_deserializer=m.response.FromString,
        )
        running = stub.future(sleeper_request(101, sleep_ms=2000), timeout=30)
        wait_started(log, 101)  # the only replica is busy for 2 s
        queued = [stub.future(sleeper_request(i), timeout=30) for i in (102, 103)]
        wait_pending(server, "sleeper", 2)  # the queue (max_queue_size 2) is full
        with pytest.raises(grpc.RpcError) as err:
            stub(sleeper_request(104), timeout=30)
        assert all(f.result().id for f in [running, *queued])
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queue_size" in err.value.details()
    pushback = dict(err.value.trailing_metadata() or ())
    assert int(pushback["grpc-retry-pushback-ms"]) >= 1
    executed = executed_ids(log)
    assert {101, 102, 103} <= set(executed) and 104 not in executed


def test_backend_failure_is_internal_and_fails_only_that_request(server):
    m = METHODS["ModelInfer"]
    with server.channel() as channel:
        stub = channel.unary_unary(
            m.path,
            request_serializer=m.request.SerializeToString,
            response_deserializer=m.response.FromString,
        )
        blocker = stub.future(
            infer_request("batchy", {"ID": np.array([[200]]), "SLEEP_MS": np.array([[300]], np.float32)}),
            timeout=30,
        )
        time.sleep(0.1)
        futures = {
            i: stub.future(
                infer_request("batchy", {"ID": np.array([[i]]), "SLEEP_MS": np.zeros((1, 1), np.float32)}),
                timeout=30,
            )
            for i in (11, 12, 13, 14)
        }
        blocker.result()
        results = {}
        for i, future in futures.items():
            try:
                results[i] = int(outputs_of(future.result())["ID_OUT"][0, 0])
            except grpc.RpcError as err:
                results[i] = err
        stats = call(channel, "ModelStatistics", pb.ModelStatisticsRequest(name="batchy")).model_stats[0]
    assert results[11] == 11 and results[12] == 12 and results[14] == 14
    failure = results[13]
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert "batchy" in failure.details() and "Traceback" not in failure.details() and "unlucky" not in failure.details()
    assert "unlucky 13" in server.log()  # the traceback goes to the log
    assert any(b.batch_size == 4 for b in stats.batch_stats)  # the four were tried together first


def test_model_loading_is_unavailable(server):
    repo = server.extra["repo"]
    sleeper_model(repo, name="slow_loader", init_s=3.0)
    loader = threading.Thread(
        target=lambda: call(
            server.channel(),
            "RepositoryModelLoad",
            pb.RepositoryModelLoadRequest(model_name="slow_loader"),
            timeout=60,
        )
    )
    loader.start()
    try:
        deadline = time.monotonic() + 60
        with server.channel() as channel:
            while not any(  # the load has begun (it takes 3 s)
                m.name == "slow_loader" and m.state == "LOADING"
                for m in call(channel, "RepositoryIndex", pb.RepositoryIndexRequest()).models
            ):
                assert time.monotonic() < deadline, "slow_loader never started loading"
                time.sleep(0.02)
            with pytest.raises(grpc.RpcError) as err:
                call(
                    channel,
                    "ModelInfer",
                    infer_request("slow_loader", {"ID": np.array([[1]]), "SLEEP_MS": np.zeros((1, 1), np.float32)}),
                )
            ready = call(channel, "ModelReady", pb.ModelReadyRequest(name="slow_loader")).ready
    finally:
        loader.join()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
    assert ready is False
    with server.channel() as channel:
        assert call(channel, "ModelReady", pb.ModelReadyRequest(name="slow_loader")).ready


def test_unloaded_model_is_unavailable_and_other_models_keep_serving(server):
    repo = server.extra["repo"]
    onnx_identity(repo, name="short_lived")
    with server.channel() as channel:
        call(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="short_lived"))
        call(channel, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="short_lived"))
        code, details = status_of(channel, infer_request("short_lived", {"INPUT0": OK}))
        assert code == grpc.StatusCode.UNAVAILABLE and "unloaded" in details
        assert outputs_of(call(channel, "ModelInfer", add_sub()))["OUTPUT0"].shape == (1, 16)


def test_deadline_already_passed_and_cancel_are_reported(server):
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            call(channel, "ModelInfer", sleeper_request(7, sleep_ms=500), timeout=0.05)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        m = METHODS["ModelInfer"]
        future = channel.unary_unary(
            m.path,
            request_serializer=m.request.SerializeToString,
            response_deserializer=m.response.FromString,
        ).future(sleeper_request(8, 300))
        time.sleep(0.05)
        future.cancel()
        assert future.cancelled()
        assert future.code() == grpc.StatusCode.CANCELLED


def test_auth_token_is_required_when_configured(tmp_path):
    onnx_identity(tmp_path / "repo")
    (tmp_path / "token").write_text("s3cret\n")
    request = infer_request("identity", {"INPUT0": OK})
    with running_server(tmp_path / "repo", "--auth-token-file", str(tmp_path / "token"), wait=False) as srv:
        time.sleep(0.5)
        with srv.channel() as channel:
            deadline = time.monotonic() + 60
            while True:  # readiness over an authenticated call
                try:
                    if call(
                        channel,
                        "ServerReady",
                        pb.ServerReadyRequest(),
                        metadata=[("authorization", "Bearer s3cret")],
                    ).ready:
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
                with pytest.raises(grpc.RpcError) as err:
                    call(channel, "ModelInfer", request, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            response = call(channel, "ModelInfer", request, metadata=[("authorization", "Bearer s3cret")])
            assert response.model_name == "identity"
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
