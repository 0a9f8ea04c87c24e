"""One loaded model version: its replicas, its batcher, its statistics, its state.

Loading happens off the event loop (backends load in threads); the version
becomes READY only after every replica has run the batch sizes it will see.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorwire.proto.codec import NUMPY_DTYPES
from tensorwire.repository import ModelConfigFile, complete_max_batch_size, completed
from tensorwire.server.backends import Placement
from tensorwire.server.backends.reshape import with_reshapes
from tensorwire.server.batcher import DynamicBatcher, InferenceRequest
from tensorwire.server.errors import ModelLoadError
from tensorwire.server.replicas import EncodedTensor, Executor, Replica, load_backends
from tensorwire.server.signature import Signature, resolve_signature
from tensorwire.server.stats import Metrics, ModelVersionStats

log = logging.getLogger("tensorwire.model")

LOADING, READY, UNLOADING, UNAVAILABLE = "LOADING", "READY", "UNLOADING", "UNAVAILABLE"


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
    """Replica placements per instance_group: GPU sets per listed GPU; CPU replicas split the cores."""
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


def load_parts(name: str, version: int, model_dir: Path, config: ModelConfigFile) -> LoadedParts:
    """Load, check and warm every replica's backend (blocking; runs in a thread)."""
    started = time.monotonic()
    label = f"{name}:{version}"
    path = model_dir / str(version) / config.model_filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; version {version} of {name} needs a {config.model_filename}"
        )
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
            bind = getattr(backend, "bind", None)
            if bind is not None:
                bind([t.name for t in signature.inputs], signature.output_names)
        executors = [Executor(backend, signature, label) for backend in backends]
        _warm_up(executors, signature, warmup_sizes(config), label)
    except BaseException:
        for backend in backends:
            backend.close()
        raise
    return LoadedParts(signature, executors, placements, time.monotonic() - started, config)


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


def _warm_up(executors: list[Executor], signature: Signature, sizes: list[int], label: str) -> None:
    from tensorwire.server.replicas import WorkItem

    for size in sizes:
        item = WorkItem(synthetic_inputs(signature, size), size, signature.output_names)
        for executor in executors:
            outcome = executor.execute([item])
            if isinstance(outcome.results[0], Exception):
                log.warning(
                    "event=warmup_failed model=%s batch=%d detail='model fails on zeros; serving anyway'",
                    label,
                    size,
                )
                return


class ModelVersion:
    """A servable version: replicas + batcher + stats, with an explicit lifecycle state."""

    def __init__(
        self,
        name: str,
        version: int,
        config: ModelConfigFile,
        parts: LoadedParts,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name, self.version, self.config = name, version, config
        self.signature = parts.signature
        self.label = f"{name}:{version}"
        self.loop = loop
        self.replicas = [
            Replica(i, executor, placement, loop)
            for i, (executor, placement) in enumerate(zip(parts.executors, parts.placements, strict=True))
        ]
        self.stats = ModelVersionStats(metrics, name, version)
        self.batcher = DynamicBatcher(
            self.label, config.max_batch_size, config.dynamic_batching, self.replicas, self.stats, loop
        )
        self.state = READY
        # ONNX Runtime string tensors hold text: BYTES inputs must be UTF-8, checked per request.
        self.utf8_inputs = frozenset(
            t.name for t in self.signature.inputs if t.datatype == "BYTES" and config.backend == "onnxruntime"
        )

    async def infer(self, request: InferenceRequest) -> list[EncodedTensor]:
        """Queue a request and wait for its outputs; a cancelled wait removes it from the queue."""
        future = self.batcher.submit(request)
        try:
            return await future
        except asyncio.CancelledError:
            self.batcher.cancel(request)
            raise

    async def retire(self, grace_seconds: float) -> None:
        """Finish accepted work (up to the grace period), then release the replicas."""
        self.state = UNLOADING
        try:
            await asyncio.wait_for(self.batcher.drain(), grace_seconds)
        except TimeoutError:
            log.warning("event=drain_timeout model=%s pending=%d", self.label, self.batcher.in_flight)
            self.batcher.close()
        await asyncio.to_thread(self._close_replicas)
        self.state = UNAVAILABLE

    def _close_replicas(self) -> None:
        for replica in self.replicas:
            replica.close()
