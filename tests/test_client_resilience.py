"""Retries, back-pressure and client-side round-robin.

Real servers for what the server really does (started late, queue full, two
servers); a scripted in-process gRPC server where the test must count exactly
what arrives (never-retried codes, pushback timing).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from client_models import in_process_server, small_repo
from model_factory import sleeper_model
from serving import free_port, running_server

from tensorwire.client import (
    AsyncInferenceClient,
    InferenceClient,
    InvalidInputError,
    RetryPolicy,
    ServerBusyError,
    UnavailableError,
)
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS, SERVICE_NAME

ONE = {"INPUT0": np.ones((1, 16), np.float32)}
PATIENT = RetryPolicy(max_attempts=200, initial_backoff=0.05, max_backoff=0.25, budget_min_per_second=50)


def successes(client: InferenceClient, model: str = "identity") -> int:
    return sum(s.inference_stats.success.count for s in client.model_statistics(model).model_stats)


# --------------------------------------------------------- real servers


def test_retries_ride_out_a_server_that_starts_late(tmp_path):
    """Nothing listens when the calls start; they succeed once the server is up."""
    repo = small_repo(tmp_path / "models")
    port = free_port()
    started = threading.Event()

    def start_later(stack: list) -> None:
        time.sleep(0.5)
        context = running_server(repo, "--grpc-port", str(port), "--drain-seconds", "0", wait=False)
        stack.append((context, context.__enter__()))
        started.set()

    stack: list = []
    starter = threading.Thread(target=start_later, args=(stack,))
    with InferenceClient(f"127.0.0.1:{port}", retry=PATIENT) as client:
        starter.start()
        try:
            assert client.server_live(timeout=60) is True
            live_retries = client.retries
            assert started.is_set() and live_retries >= 1
            # Just after binding the server is still loading its models: it answers
            # UNAVAILABLE ("loading; retry shortly"), which a client may opt into retrying.
            with InferenceClient(f"127.0.0.1:{port}",
                                 retry=RetryPolicy(max_attempts=100, retry_server_unavailable=True)) as rider:
                result = rider.infer("identity", ONE, timeout=60)
            assert np.array_equal(result["OUTPUT0"], ONE["INPUT0"])
        finally:
            starter.join()
            for context, _ in stack:
                context.__exit__(None, None, None)


def test_a_down_server_fails_fast_without_retries_and_within_the_deadline():
    port = free_port()
    with InferenceClient(f"127.0.0.1:{port}", retry=RetryPolicy.disabled()) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            client.infer("identity", ONE, timeout=5)
        assert time.monotonic() - started < 1.0 and client.retries == 0
    with InferenceClient(f"127.0.0.1:{port}", retry=PATIENT) as client:
        started = time.monotonic()
        with pytest.raises(UnavailableError):
            client.infer("identity", ONE, timeout=0.8)
        assert time.monotonic() - started < 1.5 and client.retries >= 1


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory) -> Iterator[tuple]:
    base = tmp_path_factory.mktemp("rr")
    repo_a, repo_b = small_repo(base / "a" / "models"), small_repo(base / "b" / "models")
    sleeper_model(repo_a, "busy", max_batch_size=1, dynamic_batching={"max_queue_size": 1})
    fast_stop = ("--drain-seconds", "0")
    with running_server(repo_a, *fast_stop) as a, running_server(repo_b, *fast_stop) as b:
        yield a, b


def test_round_robin_spreads_calls_over_both_servers(two_servers):
    a, b = two_servers
    with InferenceClient(a.address) as one, InferenceClient(b.address) as two:
        before = successes(one), successes(two)
        with InferenceClient(f"{a.address},{b.address}", timeout=10) as both:
            assert both.target == f"ipv4:{a.address},{b.address}"
            both.wait_until_ready("identity")
            for _ in range(40):
                both.infer("identity", ONE)
        spread = successes(one) - before[0], successes(two) - before[1]
    assert sum(spread) == 40
    assert min(spread) >= 10, f"calls per server: {spread}"


def test_queue_full_is_retried_after_the_servers_pushback(two_servers):
    """``busy`` admits one queued request; the rest get RESOURCE_EXHAUSTED + pushback and retry."""
    a, _ = two_servers

    def request(i: int) -> dict:
        return {"ID": np.array([[i]], np.int64), "SLEEP_MS": np.array([[100]], np.float32)}

    with InferenceClient(a.address, timeout=30, retry=PATIENT) as client:
        with futures.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: client.infer("busy", request(i)), range(6)))
        assert [r["ID_OUT"].item() for r in results] == list(range(6))
        assert client.retries >= 1
    with InferenceClient(a.address, timeout=30, retry=RetryPolicy.disabled()) as client:
        with futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(lambda i: _outcome(client, "busy", request(i)), range(6)))
    busy = [o for o in outcomes if isinstance(o, ServerBusyError)]
    assert busy, outcomes
    assert all(error.retry_after is not None and error.retry_after >= 0 for error in busy)


def _outcome(client: InferenceClient, model: str, inputs: dict) -> object:
    try:
        return client.infer(model, inputs)
    except ServerBusyError as error:
        return error


# ------------------------------------------------- a scripted server


class ScriptedServer:
    """An in-process server whose ModelInfer answers from a script and counts every call."""

    def __init__(self) -> None:
        self.script: list[tuple[grpc.StatusCode, str, tuple]] = []
        self.calls = 0
        self.times: list[float] = []
        method = METHODS["ModelInfer"]
        handler = grpc.unary_unary_rpc_method_handler(
            self._infer, request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE_NAME, {"ModelInfer": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _infer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        self.calls += 1
        self.times.append(time.monotonic())
        if self.script:
            code, details, trailing = self.script.pop(0)
            if trailing:
                context.set_trailing_metadata(trailing)
            context.abort(code, details)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        tensor = request.inputs[0]
        response.outputs.add(name="OUTPUT0", datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return response

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.server.stop(None)


FULL = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", (("grpc-retry-pushback-ms", "150"),))


def test_pushback_is_honoured(scripted):
    scripted.script = [FULL, FULL]
    with InferenceClient(scripted.address) as client:
        result = client.infer("m", ONE, timeout=10)
    assert scripted.calls == 3 and client.retries == 2
    gaps = np.diff(scripted.times)
    assert all(gap >= 0.14 for gap in gaps), gaps
    assert np.array_equal(result["OUTPUT0"], ONE["INPUT0"])


def test_pushback_past_the_deadline_is_not_waited_for(scripted):
    scripted.script = [(FULL[0], FULL[1], (("grpc-retry-pushback-ms", "5000"),))]
    with InferenceClient(scripted.address) as client, pytest.raises(ServerBusyError) as info:
        client.infer("m", ONE, timeout=1)
    assert scripted.calls == 1 and info.value.retry_after == 5.0


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ([(grpc.StatusCode.INVALID_ARGUMENT, "input 'INPUT0': bad shape", ())], InvalidInputError),
        ([(grpc.StatusCode.RESOURCE_EXHAUSTED, "message larger than max", ())], ServerBusyError),
        ([(grpc.StatusCode.UNAVAILABLE, "model 'm' is loading; retry shortly", ())], UnavailableError),
    ],
)
def test_unsafe_failures_reach_the_server_exactly_once(scripted, script, error):
    scripted.script = list(script)
    with InferenceClient(scripted.address, retry=PATIENT) as client, pytest.raises(error) as info:
        client.infer("m", ONE, timeout=10)
    assert scripted.calls == 1 and client.retries == 0
    assert info.value.details == script[0][1]


def test_server_unavailable_is_retried_when_opted_in(scripted):
    scripted.script = [(grpc.StatusCode.UNAVAILABLE, "draining", ())] * 2
    policy = RetryPolicy(retry_server_unavailable=True, initial_backoff=0.01)
    with InferenceClient(scripted.address, retry=policy) as client:
        client.infer("m", ONE, timeout=10)
    assert scripted.calls == 3


def test_async_client_honours_pushback_and_never_retries_invalid_argument(scripted):
    async def main() -> None:
        async with AsyncInferenceClient(scripted.address) as client:
            scripted.script = [FULL]
            await client.infer("m", ONE, timeout=10)
            assert scripted.calls == 2 and client.retries == 1
            scripted.script = [(grpc.StatusCode.INVALID_ARGUMENT, "no", ())]
            with pytest.raises(InvalidInputError):
                await client.infer("m", ONE, timeout=10)
            assert scripted.calls == 3

    asyncio.run(main())


def test_a_call_the_server_may_have_run_is_never_retried():
    """The connection drops while the server runs the request: the client must not send it again.

    (gRPC's own retryPolicy would: it retries any UNAVAILABLE that came before response
    headers, and a server killed mid-call is exactly that. This is why the SDK decides.)
    """
    ran: list[str] = []
    started = threading.Event()

    def serve(port: int, name: str, sleep_s: float) -> tuple[grpc.Server, int]:
        def infer(request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
            ran.append(name)
            started.set()
            time.sleep(sleep_s)
            return pb.ModelInferResponse(model_name=request.model_name)

        return in_process_server({"ModelInfer": infer}, port)

    first, port = serve(0, "first", 3.0)
    policy = RetryPolicy(max_attempts=10, initial_backoff=0.05, max_backoff=0.2, retry_server_unavailable=True)
    second = None
    try:
        with InferenceClient(f"127.0.0.1:{port}", retry=policy) as client:
            outcome: list[object] = []
            call = threading.Thread(target=lambda: outcome.append(_try_infer(client)))
            call.start()
            assert started.wait(30)
            first.stop(0)  # the connection drops while the request runs
            second, _ = serve(port, "second", 0.0)  # and a healthy server is there at once
            call.join(30)
            assert ran == ["first"], ran  # never sent again
            assert isinstance(outcome[0], UnavailableError) and client.retries == 0
    finally:
        first.stop(None)
        if second is not None:
            second.stop(None)


def _try_infer(client: InferenceClient) -> object:
    from tensorwire.client import Tensor

    try:
        return client.infer("m", {"INPUT0": Tensor(np.ones((1, 2), np.float32), "FP32")}, timeout=20)
    except Exception as error:  # noqa: BLE001 - the test looks at whatever came back
        return error
