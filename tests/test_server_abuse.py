"""Memory and abuse bounds: the in-flight memory budget, what an unauthenticated call costs, and
messages that are not protobuf -- against the real server over real gRPC."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from infer_helpers import infer_request
from model_factory import onnx_identity, python_model
from serving import call, running_server, scrape

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
ROWS = 2**18  # FP32 elements per request: 1 MiB of tensor data

SLOW_ECHO = """
import time

class Model:
    def execute(self, inputs):
        time.sleep(1.0)
        return {"Y": inputs["X"].copy()}
"""


def big_request(request_id: str = "") -> pb.ModelInferRequest:
    return infer_request("slow", {"X": np.ones((1, ROWS), np.float32)}, request_id=request_id)


REQUEST_BYTES = big_request().ByteSize()
BUDGET = 4 * REQUEST_BYTES  # four requests without an id fit exactly


def refused(samples, method: str, reason: str) -> float:
    key = ("tensorwire_request_refused_total", (("method", method), ("reason", reason)))
    return samples.get(key, 0.0)


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("budget") / "models"
    python_model(
        repo,
        "slow",
        SLOW_ECHO,
        {
            "max_batch_size": 16,
            "warmup": "none",
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [-1]}],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [-1]}],
            "instance_group": [{"kind": "cpu", "count": 1}],
        },
    )
    with running_server(repo, "--max-inflight-bytes", str(BUDGET), "--drain-seconds", "0") as srv:
        yield srv


def outcome(channel, request: pb.ModelInferRequest) -> tuple[str, str]:
    try:
        call(channel, "ModelInfer", request, timeout=30)
    except grpc.RpcError as err:
        return err.code().name, err.details()
    return "OK", ""


def test_requests_beyond_the_memory_budget_are_resource_exhausted_and_the_rest_complete(budget_server):
    with budget_server.channel() as channel, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: outcome(channel, big_request()), range(8)))
        codes = sorted(code for code, _ in results)
        assert codes == ["OK"] * 4 + ["RESOURCE_EXHAUSTED"] * 4, results
        for code, details in results:
            if code != "OK":
                assert "memory budget" in details and "--max-inflight-bytes" in details
        assert outcome(channel, big_request("after"))[0] == "OK"  # memory was given back
    samples = scrape(budget_server)
    assert samples[("tensorwire_inflight_bytes", ())] == 0
    assert samples[("tensorwire_inflight_bytes_limit", ())] == BUDGET
    assert refused(samples, "ModelInfer", "memory_budget") >= 4


def test_a_call_arriving_while_the_budget_is_spent_is_refused_unread(budget_server):
    with budget_server.channel() as channel, ThreadPoolExecutor(4) as pool:
        running = [pool.submit(outcome, channel, big_request()) for _ in range(4)]
        deadline = time.monotonic() + 60
        while scrape(budget_server)[("tensorwire_inflight_bytes", ())] < BUDGET:  # the four hold the whole budget
            assert time.monotonic() < deadline, "the four requests never held the budget together"
            time.sleep(0.02)
        code, details = outcome(channel, big_request("late"))
        assert code == "RESOURCE_EXHAUSTED"
        assert "this request would exceed" in details  # refused before its bytes were read
        assert [f.result()[0] for f in running] == ["OK"] * 4


def test_no_message_may_exceed_the_budget(budget_server):
    oversized = infer_request("slow", {"X": np.ones((1, 5 * ROWS), np.float32)})
    with budget_server.channel() as channel:
        code, _ = outcome(channel, oversized)
    assert code == "RESOURCE_EXHAUSTED"


def test_stream_requests_beyond_the_budget_are_refused_in_band(budget_server):
    ids = "abcdef"  # an id adds 3 bytes to a request: three fit, the fourth does not
    messages = [big_request(i).SerializeToString() for i in ids]
    with budget_server.channel() as channel:
        stream = channel.stream_stream(
            METHODS["ModelStreamInfer"].path, response_deserializer=pb.ModelStreamInferResponse.FromString
        )
        answers = list(stream(iter(messages), timeout=30))
    assert [a.infer_response.id for a in answers] == list(ids)
    errors = [a.error_message for a in answers]
    assert errors[:3] == [""] * 3
    assert all(e.startswith("RESOURCE_EXHAUSTED") and "memory budget" in e for e in errors[3:])


# ------------------------------------------------------------ authentication


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("auth")
    repo = root / "models"
    onnx_identity(repo, "identity", dims=[-1], max_batch_size=8)
    token = root / "token"
    token.write_text(TOKEN)
    with running_server(repo, "--auth-token-file", str(token), "--drain-seconds", "0", wait=False) as srv:
        deadline = time.monotonic() + 60
        with srv.channel() as channel:
            while time.monotonic() < deadline:
                try:
                    if call(channel, "ServerReady", pb.ServerReadyRequest(), timeout=1, metadata=AUTH).ready:
                        break
                except grpc.RpcError:
                    time.sleep(0.1)
        yield srv


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_unauthenticated_maximum_size_calls_cost_next_to_nothing(auth_server):
    """Eight concurrent unauthenticated 64 MiB calls (512 MiB on the wire) are refused without the server
    buffering them. Bound: 128 MiB of RSS growth, the size of two of the calls: buffering even two bodies
    would exceed it, while what a refused call costs (one HTTP/2 flow-control window and gRPC's per-call
    state, about 1-5 MiB each measured here) stays well inside it on a busy machine."""
    request = infer_request("identity", {"INPUT0": np.zeros((1, 16 * 2**20), np.float32)})
    payload = request.SerializeToString()
    del request
    pid = auth_server.process.pid
    base = rss_mib(pid)
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_mib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    codes = []
    try:
        with auth_server.channel() as channel:
            raw = channel.unary_unary(METHODS["ModelInfer"].path)

            def unauthenticated() -> None:
                try:
                    raw(payload, timeout=60)
                except grpc.RpcError as err:
                    codes.append(err.code())

            threads = [threading.Thread(target=unauthenticated) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
    finally:
        done.set()
        sampler.join()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 8
    assert max(peak) - base < 128, f"RSS grew {max(peak) - base:.0f} MiB for refused calls"
    assert refused(scrape(auth_server), "ModelInfer", "unauthenticated") >= 8


def test_unauthenticated_garbage_is_refused_before_parsing(auth_server):
    with auth_server.channel() as channel:
        for method in ("ModelInfer", "ModelStreamInfer", "ModelMetadata"):
            m = METHODS[method]
            stub = channel.stream_stream(m.path) if m.client_streaming else channel.unary_unary(m.path)
            with pytest.raises(grpc.RpcError) as caught:
                result = stub(iter([b"\xff" * 64]), timeout=5) if m.client_streaming else stub(b"\xff" * 64, timeout=5)
                list(result) if m.client_streaming else None
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # with the token, the server answers as usual
        response = call(
            channel, "ModelInfer", infer_request("identity", {"INPUT0": np.ones((1, 3), np.float32)}), metadata=AUTH
        )
        assert response.model_name == "identity"
    assert "Traceback" not in auth_server.log()


# ------------------------------------------------------------ malformed messages


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("plain") / "models"
    onnx_identity(repo, "identity", dims=[-1], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as srv:
        yield srv


@pytest.mark.parametrize("method", [m for m in METHODS if not METHODS[m].client_streaming])
def test_a_message_that_is_not_protobuf_is_invalid_argument_on_every_rpc(plain_server, method):
    with plain_server.channel() as channel:
        raw = channel.unary_unary(METHODS[method].path)
        for _ in range(20):
            with pytest.raises(grpc.RpcError) as caught:
                raw(b"\xff" * 64, timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            assert "not a valid inference." in caught.value.details()
        assert call(channel, "ServerLive", pb.ServerLiveRequest()).live  # still serving


def test_malformed_messages_get_at_most_a_rate_limited_log_line(plain_server):
    with plain_server.channel() as channel:
        raw = channel.unary_unary(METHODS["ModelInfer"].path)
        for _ in range(200):
            with pytest.raises(grpc.RpcError):
                raw(b"\x0a\xff\xff\xff\xff\x0f" + b"\x00" * 8, timeout=5)
    time.sleep(0.3)
    log = plain_server.log()
    assert "Traceback" not in log
    # one line per 10 s per kind at most; the whole module runs in well under a minute
    assert 1 <= log.count("event=malformed_message") <= 6


@pytest.mark.parametrize(
    "path, kind",
    [
        ("/grpc.health.v1.Health/Check", "unary"),
        ("/grpc.health.v1.Health/Watch", "server_stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
    ],
)
def test_health_and_reflection_refuse_garbage_the_same_way(plain_server, path, kind):
    """The health service answers without a token: garbage there must not cost a traceback per call."""
    with plain_server.channel() as channel:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as caught:
                if kind == "unary":
                    channel.unary_unary(path)(b"\xff" * 32, timeout=5)
                elif kind == "server_stream":
                    list(channel.unary_stream(path)(b"\xff" * 32, timeout=5))
                else:
                    list(channel.stream_stream(path)(iter([b"\xff" * 32]), timeout=5))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    time.sleep(0.2)
    assert "Traceback" not in plain_server.log()
