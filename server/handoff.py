"""Where a batch runs: on the event loop (inline) or on its replica's thread, measured per model.

Handing a batch to a replica's thread and hearing back costs two thread wake-ups, two GIL hand-overs and
a write to the event loop's self-pipe: tens of µs of CPU on each side (``measure_hop_ns``). A model that
runs faster than that (identity, the 8×8 digits models at small batches) is cheaper to run on the loop
itself, as a bare one-call-per-request server does. So each model is timed once at load, after warm-up
(``measure_profile``: the batch of 1 and the largest batch, fastest of a few runs), and each batch whose
predicted run time is below the measured hop runs inline. Both are timed the same way (the fastest of a
few runs: on a shared machine interference only ever adds time), so noise does not flip the decision. A
model whose inline runs turn out to cost much more CPU than measured (``RunProfile.observe``: a run time
that depends on the data) goes back to its thread for good.

Never inline: a model whose code can block or that runs elsewhere (the Python backend's process, GPU
placements), a model with variable non-batch dimensions or string inputs (its run time is not predictable
from the batch's rows), and any batch predicted to take longer than the hop. An inline run cannot be
interrupted by the execution timeout, which is why only runs measured to take µs qualify.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tensorwire.server.signature import Signature

#: Backends whose run is a native call in this process that returns on its own (no process, no socket).
IN_PROCESS_BACKENDS = frozenset({"onnxruntime", "torchscript", "torch_export", "aotinductor"})

#: Timed runs per batch size when a model is profiled. The fastest is kept, for the hop as for the model:
#: on a shared machine interference only ever adds time, and both sides of the comparison are then
#: measured the same way.
PROFILE_RUNS = 7

#: An inline run is "slow" when it takes more than this many times the larger of its prediction and the
#: hop. A run slow in wall time makes the next runs measure the loop thread's CPU time too (a syscall,
#: about 0.5 µs, so not for every run); ``SLOW_STRIKES`` runs in a row slow in CPU time send the model to
#: its thread for good. CPU time decides, not wall time: on a shared machine a preempted run's wall time
#: can be 100x its usual one (seen on the 2-core development machine, several runs in a row) while its
#: CPU time is unchanged; a model whose work depends on its data exceeds the bound whenever it meets such
#: data.
SLOW_FACTOR = 8
SLOW_STRIKES = 3


def measure_hop_ns(round_trips: int = 31) -> int:
    """The wall time (ns) of one hand-off from an event loop to a thread and back, the way a replica
    does it: ``queue.SimpleQueue.put`` wakes the thread, which answers with ``call_soon_threadsafe``
    (a write to the loop's self-pipe) to a future the loop awaits. The fastest of ``round_trips`` round
    trips (see ``PROFILE_RUNS``), on a private event loop in a helper thread (callable from any thread,
    about 1-3 ms).

    On the 2-core development machine it measured 20-26 µs (the median 25-35 µs; a bare thread-to-thread
    ping-pong, which misses the self-pipe and the loop's wake-up, 13 µs).
    """
    result: list[int] = []

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        jobs: queue.SimpleQueue = queue.SimpleQueue()

        def echo() -> None:
            while (future := jobs.get()) is not None:
                loop.call_soon_threadsafe(future.set_result, None)

        thread = threading.Thread(target=echo, name="hop-probe-echo", daemon=True)
        thread.start()
        samples = []
        for _ in range(round_trips):
            future = loop.create_future()
            started = time.perf_counter_ns()
            jobs.put(future)
            await future
            samples.append(time.perf_counter_ns() - started)
        jobs.put(None)
        thread.join()
        result.append(min(samples))

    prober = threading.Thread(target=asyncio.run, args=(probe(),), name="hop-probe", daemon=True)
    prober.start()
    prober.join()
    return result[0]


@dataclass
class RunProfile:
    """A model's measured run time as ``fixed_ns + per_row_ns * rows`` (ns, wall time of one batch run:
    concatenate, run, check, split and encode) and the hop it is compared with.

    ``demoted`` is set once inline runs proved much slower than measured (``observe``); every batch then
    goes to the thread.
    """

    fixed_ns: float
    per_row_ns: float
    hop_ns: float
    demoted: bool = False
    strikes: int = 0

    def predict_ns(self, rows: int) -> float:
        """Expected wall time of a batch of ``rows`` rows, ns."""
        return self.fixed_ns + self.per_row_ns * rows

    def inline(self, rows: int) -> bool:
        """Whether a batch of ``rows`` rows should run on the event loop: it is expected to take less
        than handing it to the replica's thread would."""
        return not self.demoted and self.fixed_ns + self.per_row_ns * rows < self.hop_ns

    @property
    def suspect(self) -> bool:
        """Whether the last run was slow: the next one must also measure its CPU time."""
        return self.strikes > 0

    def observe(self, rows: int, wall_ns: int, cpu_ns: int | None = None) -> bool:
        """An inline run of ``rows`` rows took ``wall_ns`` (and cost the loop's thread ``cpu_ns`` of CPU
        time, when measured); True when this run demoted the model."""
        bound = SLOW_FACTOR * max(self.fixed_ns + self.per_row_ns * rows, self.hop_ns)
        if (wall_ns if cpu_ns is None else cpu_ns) <= bound:
            self.strikes = 0
            return False
        if cpu_ns is None:
            self.strikes = 1  # slow by the clock: measure the next runs' CPU time
            return False
        self.strikes += 1
        if self.strikes > SLOW_STRIKES and not self.demoted:
            self.demoted = True
            return True
        return False


def measure_profile(run: Callable[[int], object], max_rows: int, hop_ns: int) -> RunProfile:
    """Time ``run(rows)`` (one blocking batch run of ``rows`` rows) and fit the line through the batch of 1
    and the batch of ``max_rows`` (the fastest of ``PROFILE_RUNS`` runs each).

    When the batch of 1 alone is slower than the hop, the largest batch is not timed (it cannot qualify):
    the line then goes through the origin, which overestimates no batch larger than 1.
    """

    def fastest_ns(rows: int) -> float:
        samples = []
        for _ in range(PROFILE_RUNS):
            started = time.perf_counter_ns()
            run(rows)
            samples.append(time.perf_counter_ns() - started)
        return float(min(samples))

    one = fastest_ns(1)
    if max_rows <= 1 or one >= hop_ns:
        return RunProfile(0.0, one, float(hop_ns))
    top = fastest_ns(max_rows)
    per_row = max(0.0, (top - one) / (max_rows - 1))
    return RunProfile(max(0.0, one - per_row), per_row, float(hop_ns))


def may_run_inline(backend: str, devices: Sequence[str], signature: Signature) -> str:
    """Why small batches of this model may never run on the event loop ('' when they may, if fast enough).

    ``backend`` is the configured backend name, ``devices`` the replicas' devices ("cpu", "cuda:0").
    """
    if backend not in IN_PROCESS_BACKENDS:
        return f"backend {backend} runs its code outside this process or may block"
    if any(device != "cpu" for device in devices):
        return "a GPU replica's run time depends on the device's other work"
    if any(-1 in t.dims or t.datatype == "BYTES" for t in signature.inputs):
        return "variable dimensions or string inputs: the run time is not predictable from the rows"
    return ""
