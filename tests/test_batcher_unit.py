"""The batcher and replicas with fake backends, no network (the batching core imports no grpc)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.proto.codec import decode_raw
from tensorwire.repository import DynamicBatching
from tensorwire.server.backends import Placement
from tensorwire.server.batcher import DynamicBatcher, InferenceRequest, shape_key
from tensorwire.server.errors import DeadlineExceededError, ModelUnavailableError, QueueFullError
from tensorwire.server.handoff import RunProfile, may_run_inline, measure_profile
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


# ------------------------------------------------------------------ hand-off, adaptive wait, lean path


class CpuBackend(FakeBackend):
    """A FakeBackend that burns ``cpu_s`` of CPU per run (not a sleep: its CPU time is what counts)."""

    def __init__(self, cpu_s: float = 0.0) -> None:
        super().__init__()
        self.cpu_s = cpu_s
        self.threads: list[str] = []

    def run(self, inputs, output_names):
        self.threads.append(threading.current_thread().name)
        started = time.thread_time()
        while time.thread_time() - started < self.cpu_s:
            pass
        return super().run(inputs, output_names)


def profiled_batcher(backend, loop, profile: RunProfile | None, replicas: int = 1, **settings) -> DynamicBatcher:
    pool = [
        Replica(i, Executor(backend, SIG, "fake:1"), Placement(), loop, profile=replace(profile) if profile else None)
        for i in range(replicas)
    ]
    stats = ModelVersionStats(Metrics(), "fake", 1)
    return DynamicBatcher("fake:1", SIG.max_batch_size, DynamicBatching(**settings), pool, stats, loop)


def test_profile_chooses_inline_only_for_a_model_faster_than_the_hop():
    fast = measure_profile(lambda rows: None, 16, hop_ns=1_000_000)  # nothing to run: far below 1 ms
    assert fast.inline(1) and fast.inline(16)
    slow = measure_profile(lambda rows: time.sleep(0.002), 16, hop_ns=50_000)
    assert not slow.inline(1) and not slow.inline(16)
    # A line through the batch of 1 and the largest batch: big batches of a cheap model go to the thread.
    line = RunProfile(fixed_ns=5_000, per_row_ns=1_000, hop_ns=20_000)
    assert line.inline(14) and not line.inline(15)


def test_models_that_may_block_or_vary_never_run_inline():
    sig = SIG  # X has a variable dimension
    fixed = Signature(inputs=(TensorSig("X", "FP32", (3,)),), outputs=(TensorSig("Y", "FP32", (3,)),), max_batch_size=8)
    assert may_run_inline("python", ["cpu"], fixed)
    assert may_run_inline("onnxruntime", ["cuda:0"], fixed)
    assert may_run_inline("onnxruntime", ["cpu"], sig)
    strings = Signature(inputs=(TensorSig("S", "BYTES", (1,)),), outputs=fixed.outputs, max_batch_size=8)
    assert may_run_inline("onnxruntime", ["cpu"], strings)
    assert may_run_inline("onnxruntime", ["cpu"], fixed) == ""


def test_a_fast_model_runs_inside_submit_on_the_loop_and_a_slow_one_on_its_thread():
    async def scenario(profile):
        backend = CpuBackend()
        batcher = profiled_batcher(backend, asyncio.get_running_loop(), profile)
        future = batcher.submit(make_request(1))
        done_at_once = future.done()  # no call_soon round trip: the batch ran inside submit
        await future
        return done_at_once, backend.threads

    inline = RunProfile(fixed_ns=1_000, per_row_ns=0, hop_ns=1_000_000)
    assert run(scenario(inline)) == (True, ["MainThread"])
    threaded = RunProfile(fixed_ns=5_000_000, per_row_ns=0, hop_ns=50_000)
    done_at_once, threads = run(scenario(threaded))
    assert not done_at_once and threads[0].startswith("replica-")
    assert run(scenario(None))[1][0].startswith("replica-")  # no profile: never inline


def test_requests_arriving_together_share_a_batch_even_when_the_model_runs_inline():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = CpuBackend()
        batcher = profiled_batcher(backend, loop, RunProfile(fixed_ns=1_000, per_row_ns=0, hop_ns=1_000_000))
        loop.call_soon(lambda: None)  # the loop has more to do in this iteration: the batch forms at its end
        futures = [batcher.submit(make_request(i)) for i in range(5)]
        assert not any(f.done() for f in futures)
        await asyncio.gather(*futures)
        return backend.batches

    assert run(scenario()) == [[0, 1, 2, 3, 4]]


def test_inline_runs_that_cost_far_more_cpu_than_measured_send_the_model_to_its_thread():
    async def scenario():
        backend = CpuBackend(cpu_s=0.004)  # measured (below) at 1 µs; each run costs 4 ms of CPU
        batcher = profiled_batcher(backend, asyncio.get_running_loop(), RunProfile(1_000, 0, hop_ns=20_000))
        for i in range(8):
            await batcher.submit(make_request(i))
        return backend.threads, batcher._replicas[0].profile.demoted

    threads, demoted = run(scenario())
    assert demoted
    assert threads[:4] == ["MainThread"] * 4  # the first slow run by the clock, then three by CPU time
    assert all(name.startswith("replica-") for name in threads[4:])


def test_the_adaptive_wait_never_delays_a_lone_request():
    """Even with a huge measured batch overhead (a batch may wait up to 200 ms) and a long
    max_queue_delay_us, a request that arrives alone (the first, or the first after a pause that
    followed a burst) goes out at once."""

    async def scenario():
        backend = FakeBackend()
        slow_hop = RunProfile(fixed_ns=200_000_000, per_row_ns=0, hop_ns=1)  # never inline, overhead 200 ms
        batcher = profiled_batcher(backend, asyncio.get_running_loop(), slow_hop, max_queue_delay_us=1_000_000)
        waits = []
        started = time.perf_counter()
        await batcher.submit(make_request(1))
        waits.append(time.perf_counter() - started)
        await asyncio.gather(*(batcher.submit(make_request(i)) for i in range(2, 12)))  # a burst
        await asyncio.sleep(0.25)  # a pause longer than the overhead
        started = time.perf_counter()
        await batcher.submit(make_request(99))
        waits.append(time.perf_counter() - started)
        return waits, backend.batches[-1]

    waits, last = run(scenario())
    assert max(waits) < 0.15, waits
    assert last == [99]


def test_the_adaptive_wait_collects_companions_when_requests_come_faster_than_a_batch_costs():
    """Twelve requests 2 ms apart, a batch costing 60 ms (measured) and max_queue_delay_us 20 ms: with
    the measured overhead they wait (up to the 20 ms) for companions; without a measurement they go one
    by one, as the replica is idle each time (Triton's rule expects too few in 20 ms to fill a batch).
    """

    async def scenario(profile):
        backend = FakeBackend()
        batcher = profiled_batcher(backend, asyncio.get_running_loop(), profile, max_queue_delay_us=20_000)
        futures = []
        for i in range(12):
            futures.append(batcher.submit(make_request(i)))
            await asyncio.sleep(0.002)
        await asyncio.gather(*futures)
        return max(len(b) for b in backend.batches), dict(batcher.stats.flush_reasons)

    biggest, reasons = run(scenario(RunProfile(fixed_ns=60_000_000, per_row_ns=0, hop_ns=1)))
    assert biggest >= 3 and reasons.get("delay_expired", 0) >= 1, (biggest, reasons)
    biggest, reasons = run(scenario(None))
    assert set(reasons) == {"replica_idle"}  # never waited (a batch of 2 only if the thread was slow to answer)


def test_no_timer_is_armed_for_requests_without_a_deadline():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = FakeBackend(sleep=0.1)
        batcher = make_batcher(backend, loop)
        blocker = batcher.submit(make_request(0))
        await asyncio.sleep(0.02)  # the replica is busy: what follows stays queued
        timers_before = len(loop._scheduled)
        queued = [make_request(i) for i in range(1, 41)]
        futures = [batcher.submit(r) for r in queued]
        timers_after = len(loop._scheduled)
        with_deadline = make_request(99, deadline=loop.time() + 10)
        futures.append(batcher.submit(with_deadline))
        await asyncio.gather(blocker, *futures)
        return timers_before, timers_after, [r.timer for r in queued], with_deadline.timer

    before, after, timers, deadline_timer = run(scenario())
    assert after == before and timers == [None] * 40
    assert deadline_timer is not None


def test_one_watchdog_timer_serves_every_batch_and_still_fails_a_hung_one():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend = FakeBackend()
        replica = Replica(0, Executor(backend, SIG, "fake:1"), Placement(), loop, execution_timeout_s=0.3)
        batcher = DynamicBatcher(
            "fake:1", 16, DynamicBatching(), [replica], ModelVersionStats(Metrics(), "fake", 1), loop
        )
        timers = set()
        for i in range(20):
            await batcher.submit(make_request(i))
            timers.add(id(replica._timer))
        backend.sleep = 1.0  # now a batch hangs past the 0.3 s execution timeout
        with pytest.raises(DeadlineExceededError, match="execution_timeout_s"):
            await batcher.submit(make_request(100))
        return timers, replica.alive

    timers, alive = run(scenario())
    assert len(timers) == 1  # armed once for twenty batches
    assert not alive


def test_prometheus_series_are_built_at_scrape_time_from_the_counters():
    metrics = Metrics(gpu=False)
    stats = ModelVersionStats(metrics, "m", 1)
    stats.begin()
    stats.record_batch(3, "full", 1_000, 2_000_000, 3_000, 1, ("cpu", "0"), [(3, 500_000)])
    stats.record_success(4_000_000)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def at(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted({"model": "m", "version": "1", **labels}.items())))]

    assert at("tensorwire_inference_count_total") == 3
    assert at("tensorwire_execution_count_total") == 1
    assert at("tensorwire_request_success_total") == 1
    assert at("tensorwire_queue_duration_seconds_bucket", le="0.001") == 1  # waited 0.5 ms
    assert at("tensorwire_queue_duration_seconds_bucket", le="0.00025") == 0
    assert at("tensorwire_request_duration_seconds_sum") == pytest.approx(0.004)
    assert at("tensorwire_batch_flush_total", reason="full") == 1
    assert at("tensorwire_replica_busy_seconds_total", device="cpu", replica="0") == pytest.approx(0.002004)
    assert metrics.retain([]) == [("m", "1")]
    assert 'model="m"' not in generate_latest(metrics.registry).decode()
