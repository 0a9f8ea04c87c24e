"""Stream answers always reach their own request: ids on every request, pairing by the echoed id.

A real server for what the SDK meets in practice (cancelled and timed-out submits, cancelled
futures, ids); an in-process gRPC server that answers out of order, or without ids, for what
only pairing by id survives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import pytest
from client_models import in_process_server
from model_factory import executed_ids, sleeper_model
from serving import running_server

from tensorwire.client import AsyncInferenceClient, InferenceClient
from tensorwire.client._pairing import StreamLedger
from tensorwire.proto import inference_pb2 as pb


def item(i: int, sleep_ms: float = 0.0) -> dict:
    return {"ID": np.array([[i]], np.int64), "SLEEP_MS": np.array([[sleep_ms]], np.float32)}


def answer(future_result) -> int:
    return int(future_result["ID_OUT"][0, 0])


# ------------------------------------------------------------------ the ledger


def test_ledger_pairs_by_id_in_any_order_and_falls_back_to_sending_order():
    ledger: StreamLedger[futures.Future] = StreamLedger()
    requests = [pb.ModelInferRequest(id=rid) for rid in ("", "", "mine", "mine")]
    pending = [futures.Future() for _ in requests]
    for request, future in zip(requests, pending, strict=True):
        ledger.add(request, future)
    first, second = requests[0].id, requests[1].id
    assert first.startswith("tw-") and first != second and len(ledger) == 4

    def response(rid: str) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(id=rid))

    assert ledger.take(response(second)) is pending[1]  # out of order, by id
    assert ledger.take(response("mine")) is pending[2]  # equal ids: in sending order
    assert ledger.take(response("unknown")) is None
    assert ledger.oldest() is pending[0]
    assert ledger.take(response("")) is pending[0]  # a server that echoes no id: the oldest
    assert ledger.drain() == [pending[3]] and len(ledger) == 0


# -------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("streams") / "models"
    sleeper_model(repo, "echo", max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as running:
        running.calls = repo / "echo.calls"
        yield running


def test_async_submit_cancelled_at_any_point_never_shifts_answers(server):
    """The defect: a submit cancelled while the call was starting left a future behind, and
    request k got request k+1's answer from then on. Cancel at every await point in turn."""

    async def trial(steps: int) -> list[tuple[int, int]]:
        async with AsyncInferenceClient(server.address, timeout=30) as client:  # fresh: metadata not cached
            async with client.stream("echo") as stream:
                task = asyncio.create_task(stream.submit(item(1)))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                sent = {i: await stream.submit(item(i)) for i in (2, 3, 4)}
                return [(i, answer(await asyncio.wait_for(f, 10))) for i, f in sent.items()]

    for steps in range(6):
        assert asyncio.run(trial(steps)) == [(2, 2), (3, 3), (4, 4)], f"cancelled after {steps} steps"


def test_async_submit_timing_out_for_room_fails_nothing_else(server):
    async def main() -> None:
        async with AsyncInferenceClient(server.address, timeout=30) as client:
            async with client.stream("echo", max_in_flight=1) as stream:
                slow = await stream.submit(item(100, sleep_ms=500))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(stream.submit(item(101)), 0.1)  # waits for room, gives up
                later = [await stream.submit(item(i)) for i in (102, 103)]
                assert answer(await slow) == 100
                assert [answer(await f) for f in later] == [102, 103]

    before = set(executed_ids(server.calls))
    asyncio.run(main())
    ran = set(executed_ids(server.calls)) - before
    assert ran == {100, 102, 103}  # the abandoned submit was never sent


def test_a_future_that_times_out_or_is_cancelled_affects_only_itself(server):
    async def main() -> None:
        async with AsyncInferenceClient(server.address, timeout=30) as client:
            async with client.stream("echo") as stream:
                slow = await stream.submit(item(200, sleep_ms=400))
                after = await stream.submit(item(201))
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(slow, 0.05)  # cancels that future only
                assert answer(await after) == 201
                assert answer(await (await stream.submit(item(202)))) == 202

    asyncio.run(main())
    with InferenceClient(server.address, timeout=30) as client, client.stream("echo") as stream:
        slow, after = stream.submit(item(300, sleep_ms=300)), stream.submit(item(301))
        with pytest.raises(futures.TimeoutError):
            slow.result(timeout=0.05)
        slow.cancel()  # its answer, when it comes, is dropped; the others still get theirs
        assert answer(after.result(timeout=10)) == 301
        assert answer(stream.submit(item(302)).result(timeout=10)) == 302


def test_every_stream_request_carries_an_id_the_server_echoes(server):
    with InferenceClient(server.address, timeout=30) as client, client.stream("echo") as stream:
        mine = [stream.submit(item(i), request_id="same") for i in (1, 2)]  # equal ids: in order
        generated = stream.submit(item(3)).result(timeout=10)
        assert [(answer(f.result(timeout=10)), f.result().id) for f in mine] == [(1, "same"), (2, "same")]
        assert generated.id.startswith("tw-")


# ------------------------------------------- a server that answers out of order


class ShuffledStreamServer:
    """Answers each group of ``group`` stream requests in reverse order (echoing ids, or not)."""

    def __init__(self, group: int, echo_ids: bool) -> None:
        self.group, self.echo_ids = group, echo_ids
        self.server, self.port = in_process_server({"ModelStreamInfer": self._stream})

    def _answer(self, request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id if self.echo_ids else "")
        tensor = request.inputs[0]
        response.outputs.add(name="ID_OUT", datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(request.raw_input_contents[0])
        return pb.ModelStreamInferResponse(infer_response=response)

    def _stream(self, requests: Iterator[pb.ModelInferRequest], context) -> Iterator[pb.ModelStreamInferResponse]:
        held: list[pb.ModelInferRequest] = []
        for request in requests:
            held.append(request)
            if len(held) == self.group:
                yield from (self._answer(r) for r in reversed(held))
                held.clear()
        yield from (self._answer(r) for r in reversed(held))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def shuffled() -> Iterator[ShuffledStreamServer]:
    server = ShuffledStreamServer(group=4, echo_ids=True)
    yield server
    server.server.stop(None)


def only_id(i: int) -> dict:
    return {"ID": np.array([[i]], np.int64)}


def test_answers_out_of_order_reach_their_own_requests(shuffled):
    # The server offers no ModelMetadata (UNIMPLEMENTED): inputs go as given.
    with InferenceClient(shuffled.address, timeout=10) as client:
        with client.stream("m", max_in_flight=16) as stream:
            sent = [stream.submit(only_id(i)) for i in range(12)]
            assert [answer(f.result(timeout=10)) for f in sent] == list(range(12))
        with client.stream("m", max_in_flight=16) as stream:
            mapped = list(stream.map(only_id(i) for i in range(12)))
        assert [answer(f.result()) for f in mapped] == list(range(12))

    async def main() -> None:
        async with AsyncInferenceClient(shuffled.address, timeout=10) as client:
            async with client.stream("m") as stream:
                sent = [await stream.submit(only_id(i)) for i in range(12)]
                assert [answer(await f) for f in sent] == list(range(12))

    asyncio.run(main())


def test_a_server_that_echoes_no_ids_is_paired_in_order():
    server = ShuffledStreamServer(group=1, echo_ids=False)  # in order, ids dropped
    try:
        with InferenceClient(server.address, timeout=10) as client, client.stream("m") as stream:
            sent = [stream.submit(only_id(i)) for i in range(20)]
            assert [answer(f.result(timeout=10)) for f in sent] == list(range(20))
    finally:
        server.server.stop(None)
