"""The batcher and replicas with fake backends, no network (the batching core imports no grpc)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorwire.proto.codec import decode_raw
from tensorwire.repository import DynamicBatching
from tensorwire.server.backends import Placement
from tensorwire.server.batcher import DynamicBatcher, InferenceRequest, shape_key
from tensorwire.server.errors import DeadlineExceededError, ModelUnavailableError, QueueFullError
from tensorwire.server.replicas import Executor, Replica, WorkItem
from tensorwire.server.signature import Signature, TensorSig
from tensorwire.server.stats import Metrics, ModelVersionStats

SIG = Signature(
    inputs=(TensorSig("X", "FP32", (-1,)), TensorSig("ID", "INT64", (1,))),
    outputs=(TensorSig("DOUBLE", "FP32", (-1,)), TensorSig("ID_OUT", "INT64", (1,))),
    max_batch_size=16,
)


class FakeBackend:
    """Doubles X and echoes ID; records every batch; can sleep and fail on a poison value."""

    inputs = outputs = None
    device = "cpu"

    def __init__(self, sleep: float = 0.0, poison: int | None = None) -> None:
        self.sleep, self.poison = sleep, poison
        self.batches: list[list[int]] = []
        self.lock = threading.Lock()

    def run(self, inputs, output_names):
        ids = inputs["ID"][:, 0].tolist()
        with self.lock:
            self.batches.append(ids)
        if self.sleep:
            time.sleep(self.sleep)
        if self.poison is not None and self.poison in ids:
            raise ValueError("poisoned")
        return {"DOUBLE": inputs["X"] * 2, "ID_OUT": inputs["ID"].copy()}

    def close(self):
        pass

    def executed_ids(self) -> set[int]:
        with self.lock:
            return {i for batch in self.batches for i in batch}


def make_request(
    ident: int, rows: int = 1, width: int = 3, deadline: float | None = None, priority: int = 0
) -> InferenceRequest:
    inputs = {
        "X": np.full((rows, width), float(ident), np.float32),
        "ID": np.full((rows, 1), ident, np.int64),
    }
    return InferenceRequest(
        inputs=inputs,
        rows=rows,
        outputs=["DOUBLE", "ID_OUT"],
        request_id=str(ident),
        deadline=deadline,
        priority=priority,
        shape_key=shape_key(inputs, True),
    )


def make_batcher(backend: FakeBackend, loop, replicas: int = 1, **settings) -> DynamicBatcher:
    pool = [Replica(i, Executor(backend, SIG, "fake:1"), Placement(), loop) for i in range(replicas)]
    stats = ModelVersionStats(Metrics(), "fake", 1)
    return DynamicBatcher("fake:1", SIG.max_batch_size, DynamicBatching(**settings), pool, stats, loop)


def decode(result) -> dict[str, np.ndarray]:
    return {name: decode_raw(raw, datatype, shape) for name, datatype, shape, raw in result}


def run(coro):
    return asyncio.run(coro)


def test_each_request_gets_its_own_rows_and_batches_form_under_load():
    async def scenario():
        backend = FakeBackend(sleep=0.01)
        batcher = make_batcher(backend, asyncio.get_running_loop())
        requests = [make_request(i, rows=1 + i % 3) for i in range(40)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            out = decode(result)
            ident = int(request.request_id)
            assert out["ID_OUT"].shape == (request.rows, 1) and (out["ID_OUT"] == ident).all()
            assert (out["DOUBLE"] == 2.0 * ident).all()
        assert max(len(set(b)) for b in backend.batches) > 1  # companions were batched
        assert batcher.stats.inference_count == sum(r.rows for r in requests)
        assert batcher.stats.execution_count == len(backend.batches)
        assert all(len(b) <= 16 for b in backend.batches)  # rows never above max_batch_size

    run(scenario())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 5), st.sampled_from([2, 3])), min_size=1, max_size=24))
def test_split_of_concat_returns_exactly_each_requests_rows(specs):
    """Property: whatever mix of sizes and shapes arrives, each request gets exactly its own rows."""

    async def scenario():
        backend = FakeBackend(sleep=0.002)
        batcher = make_batcher(backend, asyncio.get_running_loop(), replicas=2)
        requests = [make_request(i, rows, width) for i, (rows, width) in enumerate(specs)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        for request, result in zip(requests, results, strict=True):
            out = decode(result)
            np.testing.assert_array_equal(out["DOUBLE"], request.inputs["X"] * 2)
            np.testing.assert_array_equal(out["ID_OUT"], request.inputs["ID"])

    run(scenario())


def test_low_load_dispatches_at_once_without_waiting_for_the_delay():
    async def scenario():
        backend = FakeBackend()
        batcher = make_batcher(
            backend, asyncio.get_running_loop(), max_queue_delay_us=2_000_000, preferred_batch_sizes=[8]
        )
        started = time.perf_counter()
        await batcher.submit(make_request(1))
        return time.perf_counter() - started, batcher.stats.flush_reasons

    elapsed, reasons = run(scenario())
    assert elapsed < 1.0  # a 2 s delay was configured, but a lone request at low load goes at once
    assert reasons == {"replica_idle": 1}


def test_expired_request_is_answered_and_never_executed():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = FakeBackend(sleep=0.3)
        batcher = make_batcher(backend, loop)
        blocker = batcher.submit(make_request(1))
        await asyncio.sleep(0.05)  # the blocker is running; the next one must queue
        doomed = batcher.submit(make_request(2, deadline=loop.time() + 0.05))
        with pytest.raises(DeadlineExceededError, match="not run"):
            await doomed
        await blocker
        await asyncio.sleep(0.05)
        return backend.executed_ids()

    assert run(scenario()) == {1}


def test_cancelled_request_is_never_executed():
    async def scenario():
        backend = FakeBackend(sleep=0.2)
        batcher = make_batcher(backend, asyncio.get_running_loop())
        blocker = batcher.submit(make_request(1))
        await asyncio.sleep(0.05)
        victim = make_request(2)
        batcher.submit(victim)
        batcher.cancel(victim)
        await blocker
        await asyncio.sleep(0.05)
        assert batcher.queued == 0
        return backend.executed_ids()

    assert run(scenario()) == {1}


def test_full_queue_is_refused_with_pushback_while_queued_work_completes():
    async def scenario():
        backend = FakeBackend(sleep=0.1)
        batcher = make_batcher(backend, asyncio.get_running_loop(), max_queue_size=2)
        running = batcher.submit(make_request(1))
        await asyncio.sleep(0.02)
        queued = [batcher.submit(make_request(i)) for i in (2, 3)]
        with pytest.raises(QueueFullError) as refused:
            batcher.submit(make_request(4))
        assert refused.value.retry_after_ms >= 1
        await asyncio.gather(running, *queued)
        return backend.executed_ids()

    assert run(scenario()) == {1, 2, 3}


def test_pushback_is_the_time_the_replicas_need_for_the_queue_ahead():
    """The hint comes from the measured service time (here 100 ms per one-request batch), not from how
    fast requests arrive: a burst of arrivals must not shrink it."""

    async def scenario():
        backend = FakeBackend(sleep=0.1)
        batcher = make_batcher(backend, asyncio.get_running_loop(), max_queue_size=4, max_queue_delay_us=0)
        batcher.max_batch_size = 1
        await batcher.submit(make_request(0))  # one measured run
        futures = [batcher.submit(make_request(1))]
        await asyncio.sleep(0.01)  # it runs; the next four queue
        futures += [batcher.submit(make_request(i)) for i in range(2, 6)]
        with pytest.raises(QueueFullError) as refused:
            batcher.submit(make_request(99))
        await asyncio.gather(*futures)
        return refused.value.retry_after_ms

    hint_ms = run(scenario())
    assert 300 <= hint_ms <= 2000, hint_ms  # four queued x about 100 ms


def test_statistics_count_successful_work_and_the_runs_that_worked():
    async def scenario():
        backend = FakeBackend(poison=13)
        batcher = make_batcher(backend, asyncio.get_running_loop(), max_queue_delay_us=0)
        requests = [make_request(i, rows=2) for i in (1, 13, 3)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)
        return batcher.stats, results, backend.batches

    stats, results, batches = run(scenario())
    assert [isinstance(r, Exception) for r in results] == [False, True, False]
    assert batches == [[1, 1, 13, 13, 3, 3], [1, 1], [13, 13], [3, 3]]  # the batch failed, then each alone
    assert stats.inference_count == 4  # rows of the two that succeeded
    assert stats.execution_count == 2  # the reruns that worked
    c = stats.counters
    assert c.queue.count == c.compute_infer.count == 2
    assert sorted(c.batches) == [6] and c.batches[6].compute_infer.count == 1


def test_priorities_run_highest_level_first():
    async def scenario():
        backend = FakeBackend(sleep=0.1)
        batcher = make_batcher(backend, asyncio.get_running_loop(), priority_levels=2, max_queue_delay_us=0)
        batcher.max_batch_size = 1  # one request per execution, to observe the order
        blocker = batcher.submit(make_request(0))
        await asyncio.sleep(0.02)
        low = [batcher.submit(make_request(i, priority=batcher.priority_index(2))) for i in (1, 2)]
        high = [batcher.submit(make_request(i, priority=batcher.priority_index(1))) for i in (3, 4)]
        await asyncio.gather(blocker, *low, *high)
        return backend.batches

    assert [b[0] for b in run(scenario())] == [0, 3, 4, 1, 2]


def test_a_failing_batch_is_retried_per_request_so_only_the_culprit_fails():
    async def scenario():
        backend = FakeBackend(sleep=0.05, poison=13)
        batcher = make_batcher(backend, asyncio.get_running_loop())
        blocker = batcher.submit(make_request(1))
        await asyncio.sleep(0.01)
        futures = [batcher.submit(make_request(i)) for i in (11, 12, 13, 14)]
        results = await asyncio.gather(blocker, *futures, return_exceptions=True)
        return backend.batches, results

    batches, results = run(scenario())
    assert [12, 13, 14] != batches[1] and len(batches[1]) == 4  # the four went out together first
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and "fake:1" in str(errors[0]) and "poisoned" not in str(errors[0])
    assert isinstance(results[3], Exception)  # request 13
    assert all(not isinstance(r, Exception) for i, r in enumerate(results) if i != 3)


def test_drain_finishes_accepted_work_and_refuses_new():
    async def scenario():
        backend = FakeBackend(sleep=0.05)
        batcher = make_batcher(backend, asyncio.get_running_loop())
        accepted = [batcher.submit(make_request(i)) for i in range(5)]
        drained = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0)
        with pytest.raises(ModelUnavailableError):
            batcher.submit(make_request(99))
        results = await asyncio.gather(*accepted)
        await drained
        return results, backend.executed_ids()

    results, executed = run(scenario())
    assert len(results) == 5 and executed == set(range(5))


def test_executor_splits_outputs_for_unbatched_single_request():
    backend = FakeBackend()
    executor = Executor(backend, SIG, "fake:1")
    request = WorkItem(make_request(5, rows=2).inputs, 2, ["ID_OUT"])
    outcome = executor.execute([request])
    ((name, datatype, shape, raw),) = outcome.results[0]
    assert (name, datatype, shape) == ("ID_OUT", "INT64", [2, 1])
    assert outcome.timings.executions == 1
