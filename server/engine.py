"""The engine interface: what a front-end's data plane needs from the part that owns models and batches.

Both front-ends (gRPC and HTTP) talk to models only through a :class:`~tensorwire.server.dataplane.DataPlane`,
and the data plane talks to models only through an :class:`Engine`. Today the engine is in-process
(:class:`LocalEngine`, over the ``ModelManager``): resolving a name is a dictionary look-up and a submitted
request goes straight into the version's ``DynamicBatcher``. Front-end processes in front of one engine
process implement the same interface over IPC (a proxy ``ServedVersion`` whose ``batcher.submit`` sends the
decoded tensors across and whose future resolves when the answer comes back), without touching the
front-ends or the request rules.

The interface, in the order a request uses it:

- ``resolve(name, version)`` -> :class:`ServedVersion`: the version that serves a call (``""``: the latest
  ready one), with what the rules read: its ``config`` (``ModelConfigFile``: batching settings, priority
  levels, default queue timeout), its ``signature`` (the served tensors), ``utf8_inputs``.
- ``await version.infer(request)`` -> the request's encoded outputs (a cancelled wait withdraws it);
  streams use ``version.batcher.submit(request)`` (an awaitable, no task per request) and
  ``version.batcher.cancel(request)``; ``batcher.priority_index(p)`` maps a priority to a queue.
- ``version.stats``: how each request ended (``begin`` then one ``record_success``/``record_failure``), for
  every request unless ``version.counts_outcomes`` says the engine counts those that reached it.
- the repository and readiness: ``index`` (what the health statuses follow), ``load``, ``unload``,
  ``ready_versions``, ``served_versions``, ``models_ready``; ``refuse(method, reason)`` counts a call refused
  before a version resolved.
- the calls answered from the engine's own state, awaited so that an engine in another process answers them
  the same from any front-end: ``statistics`` (Triton's ModelStatistics) and ``repository_index``.

The second implementation, :class:`~tensorwire.server.remote_engine.RemoteEngine`, serves this interface in a
front-end process (``tensorwire serve --workers N``) over IPC to the engine process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Protocol, runtime_checkable

from tensorwire.proto import inference_pb2 as pb
from tensorwire.repository import ModelConfigFile
from tensorwire.server.batcher import InferenceRequest
from tensorwire.server.manager import ModelManager
from tensorwire.server.model_version import ModelVersion
from tensorwire.server.replicas import EncodedTensor
from tensorwire.server.signature import Signature


@runtime_checkable
class Scheduler(Protocol):
    """Where a version's requests queue (the ``DynamicBatcher`` in process)."""

    def priority_index(self, priority: int) -> int:
        """A request's priority (1 = highest, 0 = the model's default level) as a queue index."""
        ...

    def submit(self, request: InferenceRequest) -> Awaitable[list[EncodedTensor]]:
        """Admit a validated request; an awaitable of one ``(name, datatype, shape, raw bytes)`` per requested
        output. Raises ServingError subclasses at once (queue full, unloading) or through the awaitable."""
        ...

    def cancel(self, request: InferenceRequest) -> None:
        """Withdraw a submitted request: it never runs if still queued."""
        ...


@runtime_checkable
class OutcomeStats(Protocol):
    """The statistics of one served version, as the front-ends feed and read them (``ModelVersionStats``)."""

    def begin(self) -> None:
        """A request resolved to this version; exactly one ``record_success`` or ``record_failure`` follows."""
        ...

    def record_success(self, ns: int) -> None:
        """The request was answered ``ns`` nanoseconds after it arrived."""
        ...

    def record_failure(self, ns: int, reason: str) -> None:
        """The request failed after ``ns`` nanoseconds; ``reason`` is a ``stats.REASONS`` key."""
        ...


@runtime_checkable
class ServedVersion(Protocol):
    """One model version that can take requests (``ModelVersion`` in process)."""

    name: str
    version: int
    config: ModelConfigFile
    signature: Signature
    utf8_inputs: frozenset[str]
    batcher: Scheduler
    stats: OutcomeStats
    #: True when the engine counts the outcome of every request submitted to ``batcher`` itself (an engine in
    #: another process, which must have counted it before the answer leaves, so that statistics read after an
    #: answer include it); the data plane then counts only the requests that never reached the batcher.
    counts_outcomes: bool

    async def infer(self, request: InferenceRequest) -> list[EncodedTensor]:
        """Submit ``request`` to ``batcher`` and await its outputs; a cancelled wait withdraws it."""
        ...


@runtime_checkable
class Engine(Protocol):
    """Models, their lifecycle and their batchers, as the data plane sees them."""

    def resolve(self, name: str, version: str = "") -> ServedVersion:
        """The version serving a call: ModelNotFoundError (absent), ModelUnavailableError (not ready)."""
        ...

    def ready_versions(self, name: str) -> list[int]:
        """The model's READY versions, ascending (empty for an unknown model)."""
        ...

    def served_versions(self) -> Sequence[ServedVersion]:
        """Every version now serving or finishing work."""
        ...

    def models_ready(self) -> bool:
        """Server readiness as far as models go (strict readiness: every configured version READY)."""
        ...

    def index(self, repository_models: bool = True) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows of the models the engine has records of (with
        ``repository_models``, also the repository's folders not loaded), for the health statuses."""
        ...

    async def repository_index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows, as RepositoryIndex reports them: every model of the
        repository (loaded or not) and every version record."""
        ...

    async def statistics(self, name: str = "", version: int | None = None) -> list[pb.ModelStatistics]:
        """Triton's ModelStatistics of every served version (``name`` ''), of ``name``'s served versions
        (``version`` None) or of that one version (an empty list when it is no longer served)."""
        ...

    async def load(self, name: str) -> None:
        """(Re)load a model and wait for the outcome (ModelNotFoundError, ModelLoadError, ...)."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving a model and wait for the outcome (ModelNotFoundError for an unknown name)."""
        ...

    def refuse(self, method: str, reason: str) -> None:
        """Count a call of ``method`` refused before a version resolved (``reason``: a REASONS key)."""
        ...


class LocalEngine:
    """The engine in this process: the ``ModelManager`` and its ``Metrics``.

    Its methods are the manager's own bound methods (no extra call per request).
    """

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.resolve = manager.resolve
        self.ready_versions = manager.ready_versions
        self.served_versions = manager.served_versions
        self.models_ready = manager.models_ready
        self.index = manager.index
        self.load = manager.load
        self.unload = manager.unload
        self.refuse = manager.metrics.refuse

    async def repository_index(self) -> list[tuple[str, str, str, str]]:
        """Every repository model and version record (``ModelManager.index``)."""
        return self.manager.index()

    async def statistics(self, name: str = "", version: int | None = None) -> list[pb.ModelStatistics]:
        """ModelStatistics of the served versions that match ``name`` and ``version`` (see ``Engine``)."""
        return version_statistics(self.manager.served_versions(), name, version)


def version_statistics(
    served: Sequence[ModelVersion], name: str = "", version: int | None = None
) -> list[pb.ModelStatistics]:
    """Triton's ModelStatistics of ``served`` versions: all of them (``name`` ''), ``name``'s (``version``
    None), or the first that is ``name``:``version`` (a reload of one version shares its counters)."""
    if not name:
        return [v.stats.to_proto() for v in served]
    if version is None:
        return [v.stats.to_proto() for v in served if v.name == name]
    for v in served:
        if v.name == name and v.version == version:
            return [v.stats.to_proto()]
    return []
