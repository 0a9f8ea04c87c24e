"""ModelStreamInfer on the server: a broken stream ends with a status, answers carry their request's id,
requests carry the call's deadline, and nothing queued runs for a caller that is gone.

Raw gRPC streams (bytes on the wire) so that a test can send what no SDK would.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from infer_helpers import infer_request, outputs_of, sleeper_request
from model_factory import executed_ids, onnx_identity, sleeper_model
from polling import wait_for
from serving import call, running_server, scrape, wait_pending

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

STREAM = METHODS["ModelStreamInfer"].path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("streams") / "models"
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8)
    log = sleeper_model(repo, max_batch_size=1)
    with running_server(repo) as srv:
        srv.extra["log"] = log
        yield srv


def open_stream(channel: grpc.Channel, messages, timeout: float = 30.0):
    """A ModelStreamInfer call that sends ``messages`` (bytes) and yields the parsed answers."""
    method = channel.stream_stream(STREAM, response_deserializer=pb.ModelStreamInferResponse.FromString)
    return method(iter(messages), timeout=timeout)


def identity(request_id: str, value: float = 1.0) -> bytes:
    return infer_request(
        "identity", {"INPUT0": np.full((1, 4), value, np.float32)}, request_id=request_id
    ).SerializeToString()


def test_an_unparsable_message_ends_the_stream_with_a_status_after_the_answers_before_it(server):
    messages = [identity("a", 1.0), identity("b", 2.0), b"\xff" * 64, identity("never", 3.0)]
    started = time.monotonic()
    answers = []
    with server.channel() as channel:
        with pytest.raises(grpc.RpcError) as caught:
            for answer in open_stream(channel, messages, timeout=30):
                answers.append(answer)
    assert time.monotonic() - started < 10, "the stream went silent until the deadline"
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "message 3 of this stream" in caught.value.details()
    assert [a.infer_response.id for a in answers] == ["a", "b"]
    assert [outputs_of(a.infer_response)["OUTPUT0"][0, 0] for a in answers] == [1.0, 2.0]
    time.sleep(0.2)
    log = server.log()
    assert "event=malformed_stream_message" in log and "Traceback" not in log
    with server.channel() as channel:  # the server goes on serving streams
        assert [a.infer_response.id for a in open_stream(channel, [identity("after")])] == ["after"]


def test_every_answer_echoes_its_request_id_errors_included(server):
    good = identity("ok-1")
    unknown = infer_request("nope", {"INPUT0": np.ones((1, 4), np.float32)}, request_id="unknown-model")
    bad_shape = infer_request("identity", {"INPUT0": np.ones((1, 5), np.float32)}, request_id="bad-shape")
    bad_version = infer_request("identity", {"INPUT0": np.ones((1, 4), np.float32)}, request_id="v", version="-1")
    messages = [good, unknown.SerializeToString(), bad_shape.SerializeToString(), bad_version.SerializeToString()]
    messages.append(identity("ok-2"))
    with server.channel() as channel:
        answers = list(open_stream(channel, messages))
    assert [a.infer_response.id for a in answers] == ["ok-1", "unknown-model", "bad-shape", "v", "ok-2"]
    assert [a.error_message.split(":")[0] for a in answers] == [
        "",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "",
    ]


def test_requests_queued_when_the_stream_ends_never_run(server):
    """The caller goes away (deadline) while its requests wait behind a busy replica: none of them runs,
    and each is counted once as failed."""
    log = server.extra["log"]
    before = scrape(server)
    with server.channel() as channel:
        blocker = call_in_thread(channel, sleeper_request(7001, sleep_ms=2500))
        assert wait_for(lambda: 7001 in executed_ids(log), timeout_s=10)  # the only replica is busy for 2.5 s
        queued = [sleeper_request(i).SerializeToString() for i in (7002, 7003, 7004)]
        with pytest.raises(grpc.RpcError) as caught:
            list(open_stream(channel, queued, timeout=1.0))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        blocker.join(10)

    def failed() -> float:
        return sum(
            value - before.get(key, 0.0)
            for key, value in scrape(server).items()
            if key[0] == "tensorwire_request_failure_total" and ("model", "sleeper") in key[1]
        )

    assert wait_for(lambda: failed() >= 3, timeout_s=10)
    time.sleep(0.3)  # a fourth failure, or a withdrawn request that ran after all, would show by now
    assert failed() == 3
    ran = executed_ids(log)
    assert 7001 in ran and not {7002, 7003, 7004} & set(ran)


def test_each_streamed_request_carries_the_calls_deadline(server):
    """A request waiting in the queue when the stream's deadline passes is answered DEADLINE_EXCEEDED or
    dropped with the call; it never runs after the call is over."""
    log = server.extra["log"]
    with server.channel() as channel:
        blocker = call_in_thread(channel, sleeper_request(7101, sleep_ms=2000))
        assert wait_for(lambda: 7101 in executed_ids(log), timeout_s=10)  # the only replica is busy for 2 s
        stream = open_stream(channel, [sleeper_request(7102).SerializeToString()], timeout=0.8)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        blocker.join(10)
        run_after(channel, 7103)
    assert 7102 not in executed_ids(log)


def run_after(channel: grpc.Channel, ident: int) -> None:
    """Run request ``ident`` to completion: the queue is first-in first-out, so a request queued earlier that
    was going to run has run (or shares its batch) by the time this one is answered."""
    assert call(channel, "ModelInfer", sleeper_request(ident), timeout=30).id == str(ident)


def call_in_thread(channel: grpc.Channel, request: pb.ModelInferRequest) -> threading.Thread:
    thread = threading.Thread(target=call, args=(channel, "ModelInfer", request), kwargs={"timeout": 20})
    thread.start()
    return thread


def test_a_request_read_while_the_stream_window_is_full_never_runs_after_a_cancel(tmp_path):
    """The server reads at most 1024 requests of a stream ahead of its answers; the next one is queued in
    the batcher while the reader waits for room. Cancelling the stream then must withdraw that one too."""
    repo = tmp_path / "models"
    log = sleeper_model(repo, max_batch_size=1, dynamic_batching={"max_queue_size": 4096})
    ids = list(range(10_000, 11_100))  # 1,100 requests: more than the 1,024-request window
    with running_server(repo) as srv, srv.channel() as channel:
        blocker = call_in_thread(channel, sleeper_request(9_999, sleep_ms=6000))
        assert wait_for(lambda: 9_999 in executed_ids(log), timeout_s=10)  # the only replica is busy for 6 s
        stream = open_stream(channel, [sleeper_request(i).SerializeToString() for i in ids], timeout=60)
        # the window's 1,024 requests and the one read past it are queued, none answered
        wait_pending(srv, "sleeper", 1025)
        stream.cancel()
        blocker.join(15)
        run_after(channel, 11_200)
        assert executed_ids(log) == [9_999, 11_200]
