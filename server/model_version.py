"""One loaded model version: its replicas, its batcher, its statistics, its replica liveness.

Loading happens off the event loop (backends load in daemon threads); the version is handed to the
manager, which marks it READY, only after every replica has run the batch sizes it will see. Its
lifecycle state lives in the manager's record of the version; this object holds what serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tensorwire.proto.codec import NUMPY_DTYPES
from tensorwire.repository import ModelConfigFile, complete_max_batch_size, completed
from tensorwire.server.backends import Placement, create_backend
from tensorwire.server.backends.reshape import with_reshapes
from tensorwire.server.batcher import DynamicBatcher, InferenceRequest
from tensorwire.server.blocking import run_blocking
from tensorwire.server.errors import ModelLoadError, ModelUnavailableError
from tensorwire.server.handoff import RunProfile, may_run_inline, measure_hop_ns, measure_profile
from tensorwire.server.replicas import EncodedTensor, Executor, Replica, WorkItem, load_backends
from tensorwire.server.signature import Signature, resolve_signature
from tensorwire.server.stats import Metrics, ModelVersionStats

log = logging.getLogger("tensorwire.model")

#: How long a replica's thread may take to finish after ``stop`` when time is left in a grace period (s).
MIN_CLOSE_S = 0.2


def cpu_cores() -> int:
    """Cores this process may use (respects taskset/cgroup affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> int:
    """NVIDIA GPUs visible to this process, without importing a framework."""
    root = Path("/proc/driver/nvidia/gpus")
    count = len(list(root.iterdir())) if root.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"]))
    return count


def placements_for(config: ModelConfigFile, cores: int, gpus: int) -> list[Placement]:
    """Replica placements per instance_group: GPU sets per listed GPU; CPU replicas split the cores.

    A CPU group without ``threads`` gets ``cores // (CPU replicas)`` intra-op threads per replica, so the
    default group (``count = 1``) is one replica using every core. On 2 cores, the CNN reference model at
    concurrency 64 was as fast with 1 replica x 2 threads as with 1 x 1 or 2 x 1, and 1 x 2 cost 20-28 %
    more CPU per request at concurrency 1 (perf_analyzer, interleaved rounds; ARCHITECTURE.md, "Default
    replicas and threads"). Larger hosts are unmeasured.
    """
    result: list[Placement] = []
    cpu_groups = []
    for group in config.instance_group:
        kind = group.kind
        if kind == "auto":
            kind = "gpu" if gpus and config.backend != "python" else "cpu"
        if kind == "gpu":
            devices = group.gpus if group.gpus is not None else list(range(gpus))
            if not devices or max(devices) >= gpus:
                raise ModelLoadError(
                    f"instance_group asks for GPUs {devices or 'any'} but {gpus} are visible; "
                    "use kind = 'cpu' or 'auto'"
                )
            for device in devices:
                result += [Placement(f"cuda:{device}", group.threads or 1, group.spin_wait)] * group.count
        else:
            cpu_groups.append(group)
    total = sum(group.count for group in cpu_groups)
    for group in cpu_groups:
        threads = group.threads or max(1, cores // total)
        result += [Placement("cpu", threads, group.spin_wait)] * group.count
    cpu_threads = sum(p.threads for p in result if p.device == "cpu")
    if cpu_threads > cores:
        log.warning(
            "event=oversubscribed threads=%d cores=%d detail='intra-op threads x replicas exceed cores'",
            cpu_threads,
            cores,
        )
    return result


def warmup_sizes(config: ModelConfigFile) -> list[int]:
    """Batch sizes each replica runs before READY, so no user pays a first-shape cost."""
    if config.warmup == "none":
        return []
    if config.max_batch_size == 0:
        return [1]
    top = config.max_batch_size
    if config.warmup == "all" or (config.warmup == "auto" and top <= 64):
        return list(range(1, top + 1))
    sizes = {1 << i for i in range(top.bit_length()) if 1 << i <= top}
    return sorted(sizes | {top} | set(config.dynamic_batching.preferred_batch_sizes))


def synthetic_inputs(signature: Signature, rows: int) -> dict[str, np.ndarray]:
    """Zeros of every input's shape (variable dims as 1), for warm-up."""
    feeds = {}
    for sig in signature.inputs:
        shape = ([rows] if signature.batched else []) + [d if d > 0 else 1 for d in sig.dims]
        if sig.datatype == "BYTES":
            array = np.full(shape, b"", dtype=object)
        elif sig.datatype == "BF16":
            array = np.zeros(shape, np.float32)
        else:
            array = np.zeros(shape, NUMPY_DTYPES[sig.datatype])
        feeds[sig.name] = array
    return feeds


@dataclass
class LoadedParts:
    """What the loader thread builds; turned into replicas on the event loop."""

    signature: Signature
    executors: list[Executor]
    placements: list[Placement]
    seconds: float
    config: ModelConfigFile  # as served: max_batch_size completed from the model file when not given
    profile: RunProfile | None = None  # measured run time, when small batches may run on the event loop

    def close(self) -> None:
        """Release every backend (a load that was rolled back)."""
        for executor in self.executors:
            executor.backend.close()


def _bind(backend, signature: Signature) -> None:
    bind = getattr(backend, "bind", None)
    if bind is not None:
        bind([t.name for t in signature.inputs], signature.output_names)


def load_parts(name: str, version: int, model_dir: Path, config: ModelConfigFile) -> LoadedParts:
    """Load, check and warm every replica's backend (blocking; runs in a thread).

    Raises ModelLoadError with the reason: a missing or unloadable file, a signature conflict, a leading
    dimension that cannot be a batch dimension, or a warm-up run that failed.
    """
    started = time.monotonic()
    label = f"{name}:{version}"
    path = model_dir / str(version) / config.model_filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; version {version} of {name} needs a {config.model_filename}")
    placements = placements_for(config, cpu_cores(), visible_gpus())
    try:
        backends = load_backends(config.backend, path, placements)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"{path} could not be loaded by {config.backend}: {err}") from err
    try:
        config = _complete(config, backends[0], label)
        backends = with_reshapes(backends, config)
        first = backends[0]
        signature = resolve_signature(config, first.inputs, first.outputs)
        for backend in backends:
            _bind(backend, signature)
        executors = [Executor(backend, signature, label) for backend in backends]
        _warm_up(executors, signature, warmup_sizes(config), label)
        profile = _profile(executors[0], config, signature, label)
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return LoadedParts(signature, executors, placements, time.monotonic() - started, config, profile)


def _profile(executor: Executor, config: ModelConfigFile, signature: Signature, label: str) -> RunProfile | None:
    """Time the model after warm-up and decide whether its small batches may run on the event loop
    (``tensorwire.server.handoff``); None when they never may. The decision is logged."""
    why_not = may_run_inline(config.backend or "", [executor.backend.device], signature)
    if not why_not and config.warmup == "none":
        why_not = 'warmup = "none": the model is not run on synthetic inputs'
    if why_not:
        log.info("event=handoff model=%s inline=never reason=%r", label, why_not)
        return None
    max_rows = config.max_batch_size if signature.batched else 1
    items = {rows: WorkItem(synthetic_inputs(signature, rows), rows, signature.output_names) for rows in {1, max_rows}}

    def run(rows: int) -> None:
        result = executor.execute([items[rows]]).results[0]
        if isinstance(result, Exception):
            raise result

    try:
        profile = measure_profile(run, max_rows, measure_hop_ns())
    except Exception as err:  # noqa: BLE001 - the model runs, just not on zeros: keep it on its thread
        log.info("event=handoff model=%s inline=never reason=%r", label, f"profiling run failed: {err}")
        return None
    rows = [r for r in range(1, max_rows + 1) if profile.predict_ns(r) < profile.hop_ns]
    log.info(
        "event=handoff model=%s inline=%s hop_us=%.1f run_us=%.1f+%.2f/row",
        label,
        f"batches_up_to_{rows[-1]}_rows" if rows else "never",
        profile.hop_ns / 1e3,
        profile.fixed_ns / 1e3,
        profile.per_row_ns / 1e3,
    )
    return profile


def _complete(config: ModelConfigFile, backend: object, label: str) -> ModelConfigFile:
    """Fill in max_batch_size from the model file's shapes when the configuration leaves it out
    (Triton's auto-complete), and say what was decided and why in the log."""
    if config.max_batch_size is not None:
        return config
    decision = complete_max_batch_size(config, getattr(backend, "inputs", None), getattr(backend, "outputs", None))
    log.info(
        "event=auto_complete model=%s max_batch_size=%d dynamic_batching=%s reason=%r",
        label,
        decision.max_batch_size,
        "on" if decision.batched and config.dynamic_batching.enabled else "off",
        decision.reason,
    )
    return completed(config, decision)


def build_executor(
    label: str, path: Path, config: ModelConfigFile, signature: Signature, placement: Placement
) -> Executor:
    """A fresh, warmed backend for one replica (blocking): the replacement of a lost replica."""
    backend = with_reshapes([create_backend(config.backend, path, placement)], config)[0]
    try:
        _bind(backend, signature)
        executor = Executor(backend, signature, label)
        _warm_up([executor], signature, warmup_sizes(config), label)
    except BaseException:
        backend.close()
        raise
    return executor


def _warm_up(executors: list[Executor], signature: Signature, sizes: list[int], label: str) -> None:
    """Run each batch size on every replica with zeros.

    When every input shape is fixed by the signature, the zeros are an input the model declares valid, so a
    failure is the load's failure (ModelLoadError with the model's reason). When a shape has variable
    dimensions, the warm-up guesses them (1), and models often need more (a reflect pad needs a length of at
    least 2): a failure then says only that the guess was wrong, so it is logged and warm-up stops.
    """
    guessed = any(-1 in t.dims for t in signature.inputs)
    for size in sizes:
        item = WorkItem(synthetic_inputs(signature, size), size, signature.output_names)
        for executor in executors:
            result = executor.execute([item]).results[0]
            if isinstance(result, Exception):
                cause = result.__cause__ or result
                if guessed:
                    log.warning(
                        "event=warmup_skipped model=%s batch=%d reason=%r detail='variable dimensions were "
                        "guessed as 1; serving without warm-up'",
                        label,
                        size,
                        str(cause),
                    )
                    return
                raise ModelLoadError(
                    f"warm-up failed: model {label} fails on zeros at batch size {size}: {cause}; "
                    'fix the model or set warmup = "none" in config.toml'
                )


class ModelVersion:
    """A servable version: replicas + batcher + stats; replaces replicas it loses; retires once."""

    #: The data plane counts how each request ended (in one process the outcome is known where it is counted).
    counts_outcomes = False

    def __init__(
        self,
        name: str,
        version: int,
        config: ModelConfigFile,
        parts: LoadedParts,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        path: Path | None = None,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.signature = parts.signature
        self.label = f"{name}:{version}"
        self.loop = loop
        self.path = path
        self._timeout_s = config.execution_timeout_s
        self.profile = parts.profile
        self.replicas = [
            Replica(i, executor, placement, loop, self._timeout_s, self._on_replica_lost, self._own_profile())
            for i, (executor, placement) in enumerate(zip(parts.executors, parts.placements, strict=True))
        ]
        self._live = True
        self.stats = ModelVersionStats(metrics, name, version)
        self.batcher = DynamicBatcher(
            self.label, config.max_batch_size, config.dynamic_batching, self.replicas, self.stats, loop
        )
        self.retiring = False
        self.replacement_error = ""
        self._retire_task: asyncio.Task | None = None
        self._replacing: set[asyncio.Task] = set()
        # ONNX Runtime string tensors hold text: BYTES inputs must be UTF-8, checked per request.
        self.utf8_inputs = frozenset(
            t.name for t in self.signature.inputs if t.datatype == "BYTES" and config.backend == "onnxruntime"
        )

    def _own_profile(self) -> RunProfile | None:
        """A replica's copy of the measured profile (each corrects its own prediction)."""
        return None if self.profile is None else replace(self.profile)

    # ------------------------------------------------------------ serving

    @property
    def live(self) -> bool:
        """Whether at least one replica can run work (false while every replica is being replaced).

        Read for every request (readiness), so it is kept up to date when a replica is lost or replaced
        rather than recomputed."""
        return self._live

    def liveness_reason(self) -> str:
        """Why no replica is live ('' when one is)."""
        if self.live:
            return ""
        lost = "; ".join(sorted({r.lost_reason for r in self.replicas if r.lost_reason}))
        note = f"; the last replacement attempt failed: {self.replacement_error}" if self.replacement_error else ""
        return f"no live replica ({lost}){note}"

    async def infer(self, request: InferenceRequest) -> list[EncodedTensor]:
        """Queue a request and wait for its outputs; a cancelled wait removes it from the queue."""
        future = self.batcher.submit(request)
        try:
            return await future
        except asyncio.CancelledError:
            self.batcher.cancel(request)
            raise

    # -------------------------------------------------------- replacement

    def _on_replica_lost(self, replica: Replica) -> None:
        self._live = any(r.alive for r in self.replicas)
        if self.retiring or self.path is None:
            return
        task = self.loop.create_task(self._replace(replica))
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _replace(self, old: Replica) -> None:
        """Build a new replica in the lost one's place, retrying with back-off until it works or we retire."""
        delay_s = 0.5
        assert self.path is not None
        while not self.retiring:
            try:
                executor = await run_blocking(
                    build_executor,
                    self.label,
                    self.path,
                    self.config,
                    self.signature,
                    old.placement,
                    name=f"replace-{self.label}-{old.index}",
                    on_orphan=lambda e: e.backend.close(),
                )
            except Exception as err:  # noqa: BLE001 - shown in RepositoryIndex, retried
                self.replacement_error = f"{type(err).__name__}: {err}"
                log.error("event=replica_replace_failed model=%s replica=%d error=%r", self.label, old.index, str(err))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            if self.retiring:
                run_blocking(executor.backend.close, name=f"close-{self.label}")
                return
            new = Replica(
                old.index,
                executor,
                old.placement,
                self.loop,
                self._timeout_s,
                self._on_replica_lost,
                self._own_profile(),
            )
            self.replicas[self.replicas.index(old)] = new
            self._live = True
            self.replacement_error = ""
            self.batcher.replace_replica(old, new)
            log.info("event=replica_replaced model=%s replica=%d", self.label, old.index)
            return

    # ----------------------------------------------------------- retiring

    def retire(self, grace_s: float, why: str = "unloaded") -> asyncio.Task:
        """Stop taking work, finish what was accepted (up to ``grace_s`` seconds), then release the replicas.

        Idempotent: every caller (an unload, a reload's swap, the shutdown) gets the same task, so replicas
        are closed once. Within the grace period: queued and running requests are answered; past it they get
        UNAVAILABLE, and a replica whose thread is stuck in the model is abandoned (a Python model's
        process is killed), so retiring never takes much longer than ``grace_s``.
        """
        if self._retire_task is None:
            self._retire_task = self.loop.create_task(self._retire(grace_s, why))
        return self._retire_task

    async def _retire(self, grace_s: float, why: str) -> None:
        deadline = self.loop.time() + grace_s
        self.retiring = True
        for task in list(self._replacing):
            task.cancel()
        try:
            await asyncio.wait_for(self.batcher.drain(), grace_s)
        except TimeoutError:
            log.warning("event=drain_timeout model=%s pending=%d", self.label, self.batcher.in_flight)
            self.batcher.close(f"model {self.label} was {why}")
            for replica in self.replicas:
                replica.fail_running(
                    lambda: ModelUnavailableError(
                        f"model {self.label} was {why} before this request finished (grace period over)"
                    )
                )
        live = [replica for replica in self.replicas if replica.alive]
        for replica in live:
            replica.stop()
        close_s = max(deadline - self.loop.time(), MIN_CLOSE_S)
        stopped = await asyncio.gather(*(replica.wait_stopped(close_s) for replica in live))
        stuck = [replica for replica, done in zip(live, stopped, strict=True) if not done]
        for replica in stuck:
            replica.abort()
        if stuck:
            stopped = await asyncio.gather(*(replica.wait_stopped(MIN_CLOSE_S) for replica in stuck))
            for replica, done in zip(stuck, stopped, strict=True):
                if not done:
                    log.warning(
                        "event=replica_abandoned model=%s replica=%d detail='model still running; thread left behind'",
                        self.label,
                        replica.index,
                    )
