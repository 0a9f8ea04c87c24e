"""Replicas: each owns one backend session and one worker thread.

The event loop hands a replica a whole batch; the replica's thread does the expensive part (concatenate
inputs, run the model, check, split and encode outputs) and reports back to the loop once per batch. A
model measured to run faster than that hand-off (``handoff.RunProfile``) has its small batches run on the
loop instead (``run_inline``); slow models, and models whose code can block, never do.

Liveness: nothing a model does ends a replica's thread silently. Every exception (``SystemExit`` and
other ``BaseException`` included) becomes that batch's failure. A batch that runs past the model's
execution timeout is failed from the event loop; the replica is then marked lost (``alive`` false), its
thread abandoned (a native call cannot be interrupted; a Python model's process is killed), and its
owner builds a replacement (``on_lost``). One watchdog timer per replica serves every batch: it is armed
when a batch goes out and none is armed, and when it fires it either fails the batch that has run past the
timeout or re-arms for the running batch's own limit (no timer is created and cancelled per batch).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tensorwire.proto.codec import NUMPY_DTYPES, CodecError, encode_raw
from tensorwire.server.backends import Backend, Placement, create_backend
from tensorwire.server.backends.base import BackendCrashed, RequestDataError
from tensorwire.server.errors import BackendError, ExecutionTimeoutError, InvalidRequestError, ServingError
from tensorwire.server.handoff import RunProfile
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
    """One result per work item, in order: its encoded outputs or the error to answer it with."""

    results: list[list[EncodedTensor] | Exception]
    timings: BatchTimings = field(default_factory=BatchTimings)


class ModelOutputError(BackendError):
    """The model returned an output that breaks its served signature (missing, wrong shape or datatype)."""


def _concatenate(items: Sequence[WorkItem], names: Sequence[str]) -> dict[str, np.ndarray]:
    if len(items) == 1:
        return items[0].inputs
    return {name: np.concatenate([item.inputs[name] for item in items]) for name in names}


def _pad_batch(arrays: Sequence[np.ndarray], axis: int, length: int, value: int | float | bool) -> np.ndarray:
    """Stack requests' arrays (batch dimension first) into one batch, each padded with ``value`` to ``length``
    along ``axis`` (an axis of the arrays, so counting the batch dimension); every other dimension agrees."""
    first = arrays[0]
    shape = list(first.shape)
    shape[0] = sum(array.shape[0] for array in arrays)
    shape[axis] = length
    batch = np.full(shape, value, dtype=first.dtype)
    index: list[slice] = [slice(None)] * first.ndim
    start = 0
    for array in arrays:
        stop = start + array.shape[0]
        index[0] = slice(start, stop)
        index[axis] = slice(0, array.shape[axis])
        batch[tuple(index)] = array
        start = stop
    return batch


def _datatype_fits(dtype: np.dtype, datatype: str) -> bool:
    """Whether an output array of ``dtype`` can be sent as ``datatype`` (values are checked on encode)."""
    if datatype == "BYTES":
        return dtype.kind in "OSU"
    if datatype == "BF16":
        return dtype.kind == "f" or dtype == np.dtype("<u2") or dtype.name == "bfloat16"
    target = NUMPY_DTYPES[datatype]
    if dtype.kind not in "biuf":
        return False
    return not (dtype.kind == "f" and target.kind in "iub")


def mask_dtype(datatype: str | None) -> np.dtype:
    """The numpy dtype of a mask the server builds, from the model's datatype for it (BOOL: numpy's bool)."""
    return np.dtype(np.bool_) if datatype == "BOOL" else NUMPY_DTYPES[datatype or "INT64"]


class Executor:
    """Runs batches on one backend: concatenate (or pad), run, check, split, encode; isolates failures.

    For a model whose signature has a padding plan, requests of different lengths are padded to the
    batch's longest along each padded input's axis (the replica's thread does this, never the event
    loop), masks the server builds are added, and outputs that follow a padded input's length are cut back
    to each request's own length; other outputs are returned whole per row."""

    def __init__(self, backend: Backend, signature: Signature, label: str) -> None:
        self.backend = backend
        self.signature = signature
        self.label = label
        self._input_names = [t.name for t in signature.inputs]
        self._output_names = signature.output_names
        self._datatypes = {t.name: t.datatype for t in signature.outputs}
        # Per output, what _check_outputs compares: the served dims (after any batch dimension) and
        # whether they are all fixed (then one tuple comparison checks them).
        self._expected = [(t, tuple(t.dims), -1 not in t.dims) for t in signature.outputs]
        self._dtype_fits: dict[tuple[str, np.dtype], bool] = {}  # (output, dtype) -> _datatype_fits
        # Padding (models whose config pads variable dimensions): axes counted with the batch dimension.
        plan = signature.padding
        self._pad_inputs = {}
        self._pad_outputs = {}
        if plan is not None:
            self._pad_inputs = {
                p.name: (p.axis + 1, p.value, p.mask, None if p.mask is None else mask_dtype(p.mask_datatype))
                for p in plan.inputs
            }
            self._pad_outputs = {p.name: (p.axis + 1, p.input, self._pad_inputs[p.input][0]) for p in plan.outputs}

    def execute(self, items: Sequence[WorkItem]) -> BatchOutcome:
        """Run one batch and answer each item with its own rows of each output it asked for.

        Each item's inputs have the served datatypes and shapes (batch dimension first when the model is
        served with ``max_batch_size > 0``, ``item.rows`` rows); they are concatenated along that dimension.
        The outputs are checked against the served signature (datatype, and shape with the batch's total
        rows first). If the run or that check fails on a batch of several items, each item is rerun alone
        so that only the culprit fails. Splitting and encoding are done per item, so one item's unencodable
        output (an INT32 output holding 2**40) fails only that item. Never raises: each failure is the
        item's result (``InvalidRequestError`` when the runtime rejected the data, ``BackendError``
        otherwise). Times are nanoseconds.
        """
        timings = BatchTimings()
        t0 = time.perf_counter_ns()
        rows = items[0].rows if len(items) == 1 else sum(item.rows for item in items)
        try:
            feeds = self._padded(items, rows) if self._pad_inputs else _concatenate(items, self._input_names)
            t1 = time.perf_counter_ns()
            outputs = self.backend.run(feeds, self._output_names)
            self._check_outputs(outputs, rows)
        except BaseException as err:  # noqa: BLE001 - any model failure is isolated, never fatal
            timings.infer_ns = time.perf_counter_ns() - t0
            timings.executions = 1
            if len(items) == 1:
                return BatchOutcome([self._failure(err)], timings)
            # One request may have poisoned the batch: rerun each alone so only it fails.
            log.warning("event=batch_failed model=%s size=%d action=retry_individually", self.label, len(items))
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
        split = self.signature.batched and len(items) > 1
        for item in items:
            stop = start + item.rows
            try:
                results.append(self._encode(outputs, item, start, stop, split))
            except BaseException as err:  # noqa: BLE001 - fails this item only
                results.append(self._failure(err))
            start = stop
        t3 = time.perf_counter_ns()
        timings.input_ns, timings.infer_ns, timings.output_ns, timings.executions = t1 - t0, t2 - t1, t3 - t2, 1
        return BatchOutcome(results, timings)

    def _padded(self, items: Sequence[WorkItem], rows: int) -> dict[str, np.ndarray]:
        """The batch's feeds for a model that pads: padded inputs padded to the batch's longest request, and
        each mask the server builds (1 on a request's own positions, 0 on padding, ``[rows, length]``)."""
        feeds = {}
        for name in self._input_names:
            arrays = [item.inputs[name] for item in items]
            pad = self._pad_inputs.get(name)
            if pad is None:
                feeds[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                continue
            axis, value, mask, dtype = pad
            lengths = [array.shape[axis] for array in arrays]
            length = max(lengths)
            if len(arrays) == 1:
                feeds[name] = arrays[0]
            elif min(lengths) == length:
                feeds[name] = np.concatenate(arrays)
            else:
                feeds[name] = _pad_batch(arrays, axis, length, value)
            if mask is not None:
                built = np.zeros((rows, length), dtype)
                start = 0
                for array, own in zip(arrays, lengths, strict=True):
                    built[start : start + array.shape[0], :own] = 1
                    start += array.shape[0]
                feeds[mask] = built
        return feeds

    def _encode(
        self, outputs: dict[str, np.ndarray], item: WorkItem, start: int, stop: int, split: bool
    ) -> list[EncodedTensor]:
        encoded = []
        for name in item.outputs:
            array = outputs[name][start:stop] if split else outputs[name]
            if self._pad_outputs and name in self._pad_outputs:
                axis, source, source_axis = self._pad_outputs[name]
                own = item.inputs[source].shape[source_axis]
                if array.shape[axis] != own:  # the batch was padded past this request's length: cut it back
                    index = [slice(None)] * array.ndim
                    index[axis] = slice(0, own)
                    array = array[tuple(index)]
            try:
                datatype, shape, raw = encode_raw(array, self._datatypes[name])
            except CodecError as err:
                raise ModelOutputError(
                    f"model {self.label} returned output {name!r} that cannot be sent as {self._datatypes[name]}: {err}"
                ) from None
            encoded.append((name, datatype, shape, raw))
        return encoded

    def _check_outputs(self, outputs: dict[str, np.ndarray], rows: int) -> None:
        """Every output exists, fits its datatype and has the served shape (``rows`` first when batched)."""
        sig = self.signature
        batched = sig.batched
        for tensor, dims, fixed in self._expected:
            array = outputs.get(tensor.name)
            if not isinstance(array, np.ndarray):
                raise ModelOutputError(f"model {self.label} returned no array for output {tensor.name!r}")
            shape = array.shape
            if batched:
                fits = len(shape) == len(dims) + 1 and shape[0] == rows
                served = shape[1:]
            else:
                fits, served = len(shape) == len(dims), shape
            if fits and not (served == dims if fixed else all(e in (-1, s) for e, s in zip(dims, served, strict=True))):
                fits = False
            if not fits:
                raise ModelOutputError(
                    f"model {self.label} returned output {tensor.name!r} with shape {list(shape)} for a batch of "
                    f"{rows} rows; its signature says {sig.served_shape(tensor)}"
                )
            key = (tensor.name, array.dtype)
            ok = self._dtype_fits.get(key)
            if ok is None:
                ok = self._dtype_fits[key] = _datatype_fits(array.dtype, tensor.datatype)
            if not ok:
                raise ModelOutputError(
                    f"model {self.label} returned output {tensor.name!r} as {array.dtype}; its signature "
                    f"says {tensor.datatype}"
                )

    def _failure(self, err: BaseException) -> ServingError:
        """The error a request gets for ``err``; the log gets the details."""
        if isinstance(err, RequestDataError):
            log.info("event=request_data_rejected model=%s error=%r", self.label, str(err))
            return InvalidRequestError(f"model {self.label} rejected the request's data: {err}")
        if isinstance(err, ServingError):
            log.error("event=backend_error model=%s error=%r", self.label, str(err))
            return err
        if isinstance(err, BackendCrashed):
            log.error("event=backend_crashed model=%s error=%r", self.label, str(err))
            error = BackendError(f"model {self.label} failed while running this request: {err}")
        else:
            log.error("event=backend_error model=%s error=%r", self.label, err, exc_info=err)
            error = BackendError(f"model {self.label} failed while running this request: {type(err).__name__}")
        error.__cause__ = err
        return error


Callback = Callable[["Replica", BatchOutcome], None]


class Replica:
    """One backend session on one device, driven by its own daemon thread, watched from the event loop."""

    def __init__(
        self,
        index: int,
        executor: Executor,
        placement: Placement,
        loop: asyncio.AbstractEventLoop,
        execution_timeout_s: float = 0.0,
        on_lost: Callable[[Replica], None] | None = None,
        profile: RunProfile | None = None,
    ) -> None:
        self.index = index
        self.executor = executor
        self.placement = placement
        self.device = executor.backend.device
        self.busy_key = (self.device, str(index))  # its labels in the replica busy-time metric
        self.alive = True  # false once lost (timed out); a lost replica never gets another batch
        self.lost_reason = ""
        #: The measured run time, when small batches of this model may run on the loop (None: never).
        self.profile = profile
        self._loop = loop
        self._timeout_s = execution_timeout_s
        self._on_lost = on_lost
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # (token, items, done, loop time it went out) of the batch on the thread
        self._current: tuple[object, Sequence[WorkItem], Callback, float] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False
        self._stopped: asyncio.Future = loop.create_future()
        self._thread = threading.Thread(target=self._work, name=f"replica-{executor.label}-{index}", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._current is not None

    def inline(self, rows: int) -> bool:
        """Whether a batch of ``rows`` rows is cheaper to run on the event loop than to hand over."""
        profile = self.profile
        return profile is not None and profile.inline(rows)

    def run_inline(self, items: Sequence[WorkItem]) -> BatchOutcome:
        """Run a batch right here, on the event loop (for batches ``inline`` chose); never raises.

        The replica must be idle (the batcher gives a replica one batch at a time). Runs that cost far
        more CPU than the profile predicted send the model back to its thread (``RunProfile.observe``)."""
        profile = self.profile
        suspect = profile is not None and profile.suspect
        cpu_started = time.thread_time_ns() if suspect else 0
        started = time.perf_counter_ns()
        try:
            outcome = self.executor.execute(items)
        except BaseException as err:  # noqa: BLE001 - a model failure is the batch's, never the loop's
            outcome = BatchOutcome([self.executor._failure(err) for _ in items])
        wall_ns = time.perf_counter_ns() - started
        cpu_ns = time.thread_time_ns() - cpu_started if suspect else None
        if profile is None:
            return outcome
        rows = items[0].rows if len(items) == 1 else sum(item.rows for item in items)
        if profile.observe(rows, wall_ns, cpu_ns):
            log.warning(
                "event=handoff model=%s replica=%d inline=off reason='inline runs took %.0f us of CPU, far more "
                "than measured at load; batches go to the replica thread from now on'",
                self.executor.label,
                self.index,
                (cpu_ns or wall_ns) / 1e3,
            )
        return outcome

    def submit(self, items: Sequence[WorkItem], done: Callback) -> None:
        """Queue a batch for the thread (on the event loop); ``done(replica, outcome)`` runs on the loop
        exactly once, when the batch finishes or when it runs past the execution timeout, whichever is
        first."""
        token = object()
        self._current = (token, items, done, self._loop.time())
        if self._timeout_s > 0 and self._timer is None:
            self._timer = self._loop.call_later(self._timeout_s, self._on_timeout)
        self._jobs.put((token, items))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            token, items = job
            try:
                outcome = self.executor.execute(items)
            except BaseException as err:  # noqa: BLE001 - never let a worker thread die
                outcome = BatchOutcome([self.executor._failure(err) for _ in items])
            try:
                self._loop.call_soon_threadsafe(self._finish, token, outcome)
            except RuntimeError:  # loop closed during shutdown
                break
        try:
            self.executor.backend.close()
        except BaseException:  # noqa: BLE001
            log.exception("event=backend_close_failed model=%s replica=%d", self.executor.label, self.index)
        try:
            self._loop.call_soon_threadsafe(self._mark_stopped)
        except RuntimeError:
            pass

    def _mark_stopped(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def _finish(self, token: object, outcome: BatchOutcome) -> None:
        current = self._current
        if current is None or current[0] is not token:
            return  # already answered by the timeout
        self._current = None  # the watchdog stays armed: it finds no batch, or the next one, when it fires
        current[2](self, outcome)

    def _on_timeout(self) -> None:
        self._timer = None
        current = self._current
        if current is None:
            return  # idle: the next batch arms it again
        left_s = current[3] + self._timeout_s - self._loop.time()
        if left_s > 0:  # a later batch than the one that armed it: wait for its own limit
            self._timer = self._loop.call_later(left_s, self._on_timeout)
            return
        self._current = None
        _, items, done, _ = current
        self.alive = False
        self.lost_reason = (
            f"replica {self.index} ran a batch past execution_timeout_s ({self._timeout_s:g} s) and is being replaced"
        )
        log.error(
            "event=execution_timeout model=%s replica=%d timeout_s=%g batch=%d action=replace",
            self.executor.label,
            self.index,
            self._timeout_s,
            len(items),
        )
        message = (
            f"model {self.executor.label} did not finish this request within its execution_timeout_s "
            f"({self._timeout_s:g} s); the replica that ran it is being replaced"
        )
        done(self, BatchOutcome([ExecutionTimeoutError(message) for _ in items]))
        self.abort()
        self.stop()  # the thread ends (and closes its backend) if the stuck call ever returns
        if self._on_lost is not None:
            self._on_lost(self)

    def fail_running(self, make_error: Callable[[], Exception]) -> None:
        """Answer the batch in progress now with ``make_error()`` (shutdown past its grace period)."""
        current = self._current
        if current is None:
            return
        self._current = None
        _, items, done, _ = current
        done(self, BatchOutcome([make_error() for _ in items]))

    def abort(self) -> None:
        """Interrupt a run where the backend can (a Python model's process is killed); else nothing."""
        abort = getattr(self.executor.backend, "abort", None)
        if abort is not None:
            try:
                abort()
            except Exception:  # noqa: BLE001
                log.exception("event=abort_failed model=%s replica=%d", self.executor.label, self.index)

    def stop(self) -> None:
        """Let the thread end after the batch in progress; it then closes the backend."""
        if not self._stopping:
            self._stopping = True
            self._jobs.put(None)

    async def wait_stopped(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the thread to end (after ``stop``); whether it did."""
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True


def load_backends(kind: str, path: Path, placements: Sequence[Placement]) -> list[Backend]:
    """Create one backend per placement, in parallel threads (loading is I/O and native code)."""
    backends: list[Backend | BaseException | None] = [None] * len(placements)

    def load(i: int) -> None:
        try:
            backends[i] = create_backend(kind, path, placements[i])
        except BaseException as err:  # noqa: BLE001 - reported below
            backends[i] = err

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(len(placements))]
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
