"""Dynamic batching through the real server: correct rows, batches form, deadlines and cancellation."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from infer_helpers import infer_request, outputs_of, sleeper_request
from model_factory import executed_ids, onnx_add_sub, onnx_identity, sleeper_model, wait_started
from serving import call, running_server, wait_pending

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    onnx_add_sub(repo, max_batch_size=8)
    onnx_add_sub(repo, name="add_sub_nobatch", max_batch_size=0)
    onnx_identity(repo, name="identity", max_batch_size=64)
    log = sleeper_model(repo, max_batch_size=8, dynamic_batching={"max_queue_delay_us": 0})
    with running_server(repo) as srv:
        srv.extra["sleeper_log"] = log
        yield srv


def infer_future(channel, request, timeout=30):
    m = METHODS["ModelInfer"]
    stub = channel.unary_unary(
        m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
    )
    return stub.future(request, timeout=timeout)


def stats_of(channel, model):
    return call(channel, "ModelStatistics", pb.ModelStatisticsRequest(name=model)).model_stats[0]


def test_batched_model_gives_correct_outputs(server):
    a = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    with server.channel() as channel:
        response = call(channel, "ModelInfer", infer_request("add_sub", {"INPUT0": a, "INPUT1": b}, request_id="r1"))
    out = outputs_of(response)
    assert response.id == "r1" and response.model_version == "1"
    np.testing.assert_allclose(out["OUTPUT0"], a + b)
    np.testing.assert_allclose(out["OUTPUT1"], a - b)


def test_unbatched_model_gives_correct_outputs(server):
    a = np.arange(16, dtype=np.float32)
    with server.channel() as channel:
        response = call(
            channel,
            "ModelInfer",
            infer_request("add_sub_nobatch", {"INPUT0": a, "INPUT1": a}, outputs=["OUTPUT1"]),
        )
    out = outputs_of(response)
    assert list(out) == ["OUTPUT1"] and out["OUTPUT1"].shape == (16,)
    np.testing.assert_array_equal(out["OUTPUT1"], np.zeros(16, np.float32))


def test_32_concurrent_single_sample_clients_get_their_own_rows_in_batches(server):
    with server.channel() as channel:
        before = stats_of(channel, "sleeper")

        def one_client(client: int) -> list[int]:
            got = []
            for k in range(5):
                ident = 1000 + client * 10 + k
                response = call(channel, "ModelInfer", sleeper_request(ident, sleep_ms=2))
                got.append(int(outputs_of(response)["ID_OUT"][0, 0]))
                assert response.id == str(ident)
            return got

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(one_client, range(32)))
        after = stats_of(channel, "sleeper")
    for client, got in enumerate(results):
        assert got == [1000 + client * 10 + k for k in range(5)]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == 160
    assert inferences / executions > 1.0, f"average batch {inferences / executions:.2f}"
    assert {b.batch_size for b in after.batch_stats} - {1}


def test_identity_model_under_concurrency_returns_each_clients_values(server):
    with server.channel() as channel:
        futures = [
            infer_future(
                channel,
                infer_request("identity", {"INPUT0": np.full((1, 16), i, np.float32)}, request_id=str(i)),
            )
            for i in range(200)
        ]
        for i, future in enumerate(futures):
            response = future.result()
            assert response.id == str(i)
            assert (outputs_of(response)["OUTPUT0"] == i).all()


def test_request_past_its_deadline_is_never_executed(server):
    log = server.extra["sleeper_log"]
    with server.channel() as channel:
        blocker = infer_future(channel, sleeper_request(2001, sleep_ms=2000))
        wait_started(log, 2001)  # the only replica is busy for 2 s
        # Server-side queue timeout (the v2 'timeout' parameter, microseconds): the server answers.
        with pytest.raises(grpc.RpcError) as server_side:
            call(channel, "ModelInfer", sleeper_request(2002, parameters={"timeout": 100_000}))
        # A gRPC deadline: the server's timer drops the queued request too.
        with pytest.raises(grpc.RpcError) as client_side:
            call(channel, "ModelInfer", sleeper_request(2003), timeout=0.15)
        blocker.result()
        call(channel, "ModelInfer", sleeper_request(2004))
    assert server_side.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not run" in server_side.value.details()
    assert client_side.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    executed = executed_ids(log)
    assert 2001 in executed and 2004 in executed
    assert 2002 not in executed and 2003 not in executed


def test_cancelled_queued_request_is_never_executed(server):
    log = server.extra["sleeper_log"]
    with server.channel() as channel:
        blocker = infer_future(channel, sleeper_request(3001, sleep_ms=2000))
        wait_started(log, 3001)  # the only replica is busy for 2 s
        victim = infer_future(channel, sleeper_request(3002))
        wait_pending(server, "sleeper", 1)  # the victim is queued
        assert victim.cancel()
        blocker.result()
        call(channel, "ModelInfer", sleeper_request(3003))
    with pytest.raises(grpc.FutureCancelledError):
        victim.result()
    executed = executed_ids(log)
    assert 3001 in executed and 3003 in executed and 3002 not in executed


def test_priority_parameter_is_accepted_and_bounded(server):
    with server.channel() as channel:
        call(channel, "ModelInfer", sleeper_request(4001, parameters={"priority": 1}))
        with pytest.raises(grpc.RpcError) as err:
            call(channel, "ModelInfer", sleeper_request(4002, parameters={"priority": 5}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority_levels" in err.value.details()
