"""SIGTERM under load: readiness flips first, accepted work completes, new work is refused, exit 0."""

from __future__ import annotations

import signal
import time

import grpc
from infer_helpers import sleeper_request
from model_factory import executed_ids, sleeper_model
from serving import call, pending_requests, running_server

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS


def test_sigterm_drains_accepted_requests_and_exits_zero(tmp_path):
    repo = tmp_path / "repo"
    log = sleeper_model(repo, max_batch_size=2, dynamic_batching={"max_queue_delay_us": 0})
    with running_server(repo, "--drain-seconds", "0.6", "--grace-seconds", "20") as server:
        m = METHODS["ModelInfer"]
        with server.channel() as channel:
            stub = channel.unary_unary(
                m.path,
                request_serializer=m.request.SerializeToString,
                response_deserializer=m.response.FromString,
            )
            accepted = [stub.future(sleeper_request(i, sleep_ms=150), timeout=60) for i in range(21, 41)]
            # all 20 are queued or have started (10 batches x 150 ms = 1.5 s of work)
            deadline = time.monotonic() + 60
            while len(set(executed_ids(log)) & set(range(21, 41))) + pending_requests(server, "sleeper") < 20:
                assert time.monotonic() < deadline, "the 20 requests never all reached the server"
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while call(channel, "ServerReady", pb.ServerReadyRequest()).ready:  # readiness flips first
                assert time.monotonic() < deadline, "ServerReady stayed true after SIGTERM"
                time.sleep(0.01)
            during_drain_window = stub(sleeper_request(500), timeout=30)  # still served in the window
            time.sleep(0.6)
            refused = None
            try:
                stub(sleeper_request(600), timeout=30)
            except grpc.RpcError as err:
                refused = err
            results = [f.result() for f in accepted]
        exit_code = server.process.wait(60)
    assert [r.id for r in results] == [str(i) for i in range(21, 41)]  # nothing accepted was lost
    assert during_drain_window.id == "500"
    assert refused is not None and refused.code() == grpc.StatusCode.UNAVAILABLE
    assert exit_code == 0
    executed = set(executed_ids(log))
    assert set(range(21, 41)) <= executed and 600 not in executed
    assert "event=stopped" in server.log()
