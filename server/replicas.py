"""Replicas: each owns one backend session and one worker thread.

The event loop hands a replica a whole batch; the replica's thread does the
expensive part (concatenate inputs, run the model, split and encode outputs)
and reports back to the loop once per batch. The loop never runs model code
or big copies.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tensorwire.proto.codec import encode_raw
from tensorwire.server.backends import Backend, Placement, create_backend
from tensorwire.server.errors import BackendError
from tensorwire.server.signature import Signature

log = logging.getLogger("tensorwire.replica")

#: One encoded output tensor: (name, datatype, shape, raw bytes).
EncodedTensor = tuple[str, str, list[int], bytes]


@dataclass
class BatchTimings:
    """Nanoseconds spent in the worker on one batch (Triton's compute_input/infer/output split)."""

    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    executions: int = 0


class WorkItem:
    """What a replica needs of a request: its inputs, rows and the outputs it wants."""

    __slots__ = ("inputs", "rows", "outputs")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, outputs: Sequence[str]) -> None:
        self.inputs, self.rows, self.outputs = inputs, rows, outputs


@dataclass
class BatchOutcome:
    results: list[list[EncodedTensor] | Exception]
    timings: BatchTimings = field(default_factory=BatchTimings)


def _concatenate(items: Sequence[WorkItem], names: Sequence[str]) -> dict[str, np.ndarray]:
    if len(items) == 1:
        return items[0].inputs
    return {name: np.concatenate([item.inputs[name] for item in items]) for name in names}


class Executor:
    """Runs batches on one backend: concatenate, run, split, encode; isolates failures."""

    def __init__(self, backend: Backend, signature: Signature, label: str) -> None:
        self.backend = backend
        self.signature = signature
        self.label = label
        self._input_names = [t.name for t in signature.inputs]
        self._output_names = signature.output_names
        self._datatypes = {t.name: t.datatype for t in signature.outputs}

    def execute(self, items: Sequence[WorkItem]) -> BatchOutcome:
        timings = BatchTimings()
        t0 = time.perf_counter_ns()
        feeds = _concatenate(items, self._input_names)
        t1 = time.perf_counter_ns()
        try:
            outputs = self.backend.run(feeds, self._output_names)
            self._check_rows(outputs, sum(item.rows for item in items))
        except Exception as err:  # noqa: BLE001 - any model failure is isolated, not fatal
            timings.input_ns, timings.infer_ns = t1 - t0, time.perf_counter_ns() - t1
            timings.executions = 1
            if len(items) == 1:
                return BatchOutcome([self._failure(err)], timings)
            # One request may have poisoned the batch: rerun each alone so only it fails.
            log.warning(
                "event=batch_failed model=%s size=%d action=retry_individually", self.label, len(items)
            )
            outcome = BatchOutcome([], timings)
            for item in items:
                single = self.execute([item])
                outcome.results.extend(single.results)
                outcome.timings.infer_ns += single.timings.infer_ns
                outcome.timings.input_ns += single.timings.input_ns
                outcome.timings.output_ns += single.timings.output_ns
                outcome.timings.executions += single.timings.executions
            return outcome
        t2 = time.perf_counter_ns()
        results: list[list[EncodedTensor] | Exception] = []
        start = 0
        for item in items:
            stop = start + item.rows
            encoded = []
            for name in item.outputs:
                array = outputs[name]
                if self.signature.batched and len(items) > 1:
                    array = array[start:stop]
                datatype, shape, raw = encode_raw(array, self._datatypes[name])
                encoded.append((name, datatype, shape, raw))
            results.append(encoded)
            start = stop
        t3 = time.perf_counter_ns()
        timings.input_ns, timings.infer_ns, timings.output_ns, timings.executions = (
            t1 - t0,
            t2 - t1,
            t3 - t2,
            1,
        )
        return BatchOutcome(results, timings)

    def _check_rows(self, outputs: dict[str, np.ndarray], rows: int) -> None:
        if not self.signature.batched:
            return
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != rows:
                raise RuntimeError(
                    f"output {name!r} has shape {list(array.shape)} for a batch of {rows} rows"
                )

    def _failure(self, err: Exception) -> BackendError:
        log.error("event=backend_error model=%s error=%r\n%s", self.label, err, traceback.format_exc())
        return BackendError(f"model {self.label} failed while running this request: {type(err).__name__}")


Callback = Callable[["Replica", BatchOutcome], None]


class Replica:
    """One backend session on one device, driven by its own thread."""

    def __init__(
        self, index: int, executor: Executor, placement: Placement, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.index = index
        self.executor = executor
        self.placement = placement
        self.device = executor.backend.device
        self._loop = loop
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.busy_ns = 0
        self._thread = threading.Thread(
            target=self._work, name=f"replica-{executor.label}-{index}", daemon=True
        )
        self._thread.start()

    def submit(self, items: Sequence[WorkItem], done: Callback) -> None:
        """Queue a batch; ``done(replica, outcome)`` runs on the event loop afterwards."""
        self._jobs.put((items, done))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            items, done = job
            started = time.perf_counter_ns()
            try:
                outcome = self.executor.execute(items)
            except Exception as err:  # noqa: BLE001 - never let a worker thread die
                outcome = BatchOutcome([self.executor._failure(err) for _ in items])
            self.busy_ns += time.perf_counter_ns() - started
            try:
                self._loop.call_soon_threadsafe(done, self, outcome)
            except RuntimeError:  # loop closed during shutdown
                break

    def close(self) -> None:
        """Stop the thread after any queued batch, then release the backend."""
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.executor.backend.close()


def load_backends(kind: str, path: Path, placements: Sequence[Placement]) -> list[Backend]:
    """Create one backend per placement, in parallel threads (loading is I/O and native code)."""
    backends: list[Backend | BaseException | None] = [None] * len(placements)

    def load(i: int) -> None:
        try:
            backends[i] = create_backend(kind, path, placements[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            backends[i] = err

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(placements))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [b for b in backends if isinstance(b, BaseException)]
    if errors:
        for backend in backends:
            if backend is not None and not isinstance(backend, BaseException):
                backend.close()
        raise errors[0]
    return backends  # type: ignore[return-value]
