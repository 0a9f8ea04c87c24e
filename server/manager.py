"""The model manager: which models and versions exist, their lifecycle states, and load/unload.

Explicit model control (Triton's ``--model-control-mode=explicit`` plus load-all at start): everything in
the repository is loaded at start; afterwards only RepositoryModelLoad/Unload (or ``--poll``) change what
is served. A reload brings the new versions up and warms them before the old ones stop taking work, so a
rollout fails no request. A model that fails to load never stops the others: it shows as UNAVAILABLE with
its reason.

Lifecycle work never depends on the caller: each load or unload runs as its own task, one at a time per
model, to completion (or a clean roll-back); the RPC that asked only waits for the outcome, so a caller's
timeout or cancellation leaves no model LOADING or UNLOADING. The latest request wins: an unload asked for
while a load runs makes that load roll back, and a server that drains loads nothing more. Every version
has one record (``VersionRecord``) holding its state (``ModelState``) and reason, as Triton keeps one per
version; readiness, RepositoryIndex and health are read from those records.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tensorwire.repository import (
    RepositoryConfigError,
    available_versions,
    check_model_name,
    is_model_folder,
    list_models,
    read_model_config,
)
from tensorwire.server.blocking import run_blocking
from tensorwire.server.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServingError,
    echo,
)
from tensorwire.server.model_version import LoadedParts, ModelVersion, load_parts
from tensorwire.server.stats import Metrics

log = logging.getLogger("tensorwire.manager")


class ModelState(enum.StrEnum):
    """A version's lifecycle state, with Triton's names (the text RepositoryIndex reports).

    Transitions: (none) → LOADING → READY | UNAVAILABLE(reason); READY → UNLOADING → UNAVAILABLE("unloaded");
    READY stays READY during a reload until the new instance replaces it. A READY version whose every
    replica is lost reports UNAVAILABLE (with why) until a replacement is live.
    """

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


LOADING, READY, UNLOADING, UNAVAILABLE = ModelState
#: The reason of a version unloaded on request; strict readiness does not wait for such versions.
UNLOADED = "unloaded"


@dataclass
class VersionRecord:
    """One version of one model: its state and reason, and the instance serving it (if any)."""

    version: int
    state: ModelState
    reason: str = ""
    served: ModelVersion | None = None

    def status(self) -> tuple[ModelState, str]:
        """(state, reason) as clients see it: a READY version without a live replica is UNAVAILABLE."""
        if self.state is READY and self.served is not None and not self.served.live:
            return UNAVAILABLE, self.served.liveness_reason()
        return self.state, self.reason


@dataclass
class ModelRecord:
    """Everything known about one model name."""

    name: str
    versions: dict[int, VersionRecord] = field(default_factory=dict)
    # The model as a whole, for its versionless index row while no version is known (e.g. a bad config).
    state: ModelState = UNAVAILABLE
    reason: str = "not loaded"
    fingerprint: tuple = ()
    wanted: bool = True  # the latest request for this model: load (True) or unload (False)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def serving(self) -> list[ModelVersion]:
        return [v.served for v in self.versions.values() if v.served is not None]


def unknown_model(name: str) -> ModelNotFoundError:
    """The error for a model name the server has no record of."""
    return ModelNotFoundError(f"unknown model {echo(name)}; RepositoryIndex lists the models this server has")


def not_a_version(name: str, version: str) -> ModelNotFoundError:
    """The error for a version string that is not ASCII digits."""
    return ModelNotFoundError(f"model {name!r} has no version {echo(version)}; versions are positive integers")


def unknown_version(name: str, version: int, ready: list[int]) -> ModelNotFoundError:
    """The error for a version number the model has no record of (``ready``: its READY versions)."""
    return ModelNotFoundError(f"model {name!r} has no version {version}; ready versions: {ready}")


def fingerprint(model_dir: Path) -> tuple:
    """Changes whenever the config or any version's files change (for --poll)."""
    entries = []
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(model_dir).parts):
            stat = path.stat()
            entries.append((str(path.relative_to(model_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


class ModelManager:
    """Owns every ModelVersion and its record; resolves names for the servicer.

    ``grace_s`` bounds how long an unload or a reload's swap lets accepted requests finish.
    ``strict_readiness`` (Triton's default) makes ``models_ready`` false unless every model the server
    is meant to serve is READY; lenient readiness only asks that the server is up.
    """

    def __init__(self, repo: Path, metrics: Metrics, grace_s: float = 30.0, strict_readiness: bool = True) -> None:
        self.repo = Path(repo)
        self.metrics = metrics
        self.grace_s = grace_s
        self.strict_readiness = strict_readiness
        self.draining = False
        self._records: dict[str, ModelRecord] = {}
        self._retiring: set[asyncio.Task] = set()
        self._ops: set[asyncio.Task] = set()
        absolute = str(self.repo.resolve())
        self._hidden = sorted({absolute, str(self.repo)} - {"", "."}, key=len, reverse=True)
        self._hidden = [p for p in self._hidden if p.startswith("/")]

    # ------------------------------------------------------------ queries

    def public(self, text: str) -> str:
        """``text`` with the repository's absolute path taken out: files are named relative to it."""
        for prefix in self._hidden:
            text = text.replace(prefix + "/", "").replace(prefix, "<repository>")
        return text

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve a request: NOT_FOUND if absent, UNAVAILABLE if not ready."""
        record = self._records.get(name)
        if record is None:
            raise unknown_model(name)
        if version:
            if not (version.isascii() and version.isdigit()):  # str.isdigit alone admits '²', '١'...
                raise not_a_version(name, version)
            entry = record.versions.get(int(version))
            if entry is None:
                raise unknown_version(name, int(version), self.ready_versions(name))
            state, reason = self._status(entry)
            if state is READY:
                assert entry.served is not None
                return entry.served
            if state in (LOADING, UNLOADING):
                raise ModelUnavailableError(f"model {name!r} version {version} is {state.lower()}; retry shortly")
            raise ModelUnavailableError(f"model {name!r} version {version} is not ready: {reason or state}")
        ready = [e for e in record.versions.values() if e.status()[0] is READY]
        if ready:
            served = max(ready, key=lambda e: e.version).served
            assert served is not None
            return served
        state, reason = self._model_status(record)
        if state in (LOADING, UNLOADING):
            raise ModelUnavailableError(f"model {name!r} is {state.lower()}; retry shortly")
        raise ModelUnavailableError(f"model {name!r} is not ready: {reason}")

    def _status(self, entry: VersionRecord) -> tuple[ModelState, str]:
        state, reason = entry.status()
        return state, self.public(reason)

    def _model_status(self, record: ModelRecord) -> tuple[ModelState, str]:
        """The model as a whole: its best version's state, or its own while it has no version record."""
        if not record.versions:
            return record.state, record.reason
        statuses = {v: self._status(e) for v, e in sorted(record.versions.items())}
        for state in (READY, LOADING, UNLOADING):
            if any(s is state for s, _ in statuses.values()):
                return state, ""
        if all(r == UNLOADED for _, r in statuses.values()):
            return UNAVAILABLE, UNLOADED
        return UNAVAILABLE, "; ".join(f"version {v}: {r}" for v, (_, r) in statuses.items())

    def ready_versions(self, name: str) -> list[int]:
        record = self._records.get(name)
        if record is None:
            return []
        return sorted(v for v, e in record.versions.items() if e.status()[0] is READY)

    def served_versions(self) -> list[ModelVersion]:
        """Every instance now serving or finishing work (any state)."""
        return [v for record in self._records.values() for v in record.serving()]

    def models_ready(self) -> bool:
        """Server readiness as far as models go.

        Strict (Triton's ``--strict-readiness``, the default): every model the server is meant to serve
        has every version READY with a live replica; versions unloaded on request do not count, a model
        that failed to load or is still loading does. Lenient: always true (the server is up).
        """
        if not self.strict_readiness:
            return True
        for record in self._records.values():
            if not record.versions:
                if record.reason != UNLOADED:
                    return False
                continue
            for entry in record.versions.values():
                state, reason = entry.status()
                if state is not READY and reason != UNLOADED:
                    return False
        return True

    def warn_not_ready(self) -> bool:
        """At the end of start-up, when strict readiness keeps the server not ready: one WARNING line
        (``event=not_ready``) naming each model version that is not READY with its state and reason, and
        the way to serve the others (``--no-strict-readiness``). Returns whether it logged."""
        if self.models_ready():
            return False
        waiting = [
            f"{name}{':' + version if version else ''}:{state}" + (f" ({reason})" if reason else "")
            for name, version, state, reason in self.index()
            if state != READY.value and reason != UNLOADED
        ]
        log.warning(
            "event=not_ready models=%s detail=%r",
            waiting,
            "strict readiness: ServerReady (/v2/health/ready) stays false until every model is READY; "
            "fix or remove these models, or start with --no-strict-readiness to serve the others",
        )
        return True

    def index(self, repository_models: bool = True) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows, as RepositoryIndex reports them (paths relative)."""
        rows: list[tuple[str, str, str, str]] = []
        names = set(self._records)
        if repository_models:
            try:
                names |= set(list_models(self.repo))
            except OSError:
                pass
        for name in sorted(names):
            record = self._records.get(name)
            if record is None:
                rows.append((name, "", UNAVAILABLE.value, "not loaded"))
                continue
            if not record.versions:
                rows.append((name, "", record.state.value, record.reason))
            for version, entry in sorted(record.versions.items()):
                state, reason = self._status(entry)
                rows.append((name, str(version), state.value, reason))
        return rows

    # ---------------------------------------------------------- lifecycle

    def announce(self) -> None:
        """Record every repository model as LOADING, so that calls before load_all finishes
        get UNAVAILABLE ("loading, retry") rather than NOT_FOUND."""
        for name in list_models(self.repo) if self.repo.is_dir() else []:
            self._records.setdefault(name, ModelRecord(name, state=LOADING, reason="server starting"))

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded and logged, not raised."""
        names = list_models(self.repo) if self.repo.is_dir() else []
        if not names:
            log.warning("event=empty_repository repo=%s", self.repo)
        for name in names:
            if self.draining:
                return
            try:
                await self.load(name)
            except ServingError:
                pass  # logged by the load itself

    async def load(self, name: str) -> None:
        """(Re)load a model from the repository and wait for the outcome.

        The load runs as its own task: cancelling the caller does not stop it. Raises ModelNotFoundError
        (invalid name, no such model), ModelLoadError (it failed; the reason names files relative to the
        repository), ModelUnavailableError (the server is draining, or an unload came meanwhile).
        """
        try:
            check_model_name(name)
        except RepositoryConfigError:
            raise ModelNotFoundError(
                f"invalid model name {echo(name)}: use letters, digits, '_', '-' and '.', "
                "starting with a letter or digit"
            ) from None
        if self.draining:
            raise ModelUnavailableError(f"the server is shutting down; model {name!r} was not loaded")
        if not is_model_folder(self.repo / name):
            raise ModelNotFoundError(
                f"model {name!r} is not in the model repository "
                f"(no {name}/ folder with a config.toml, config.pbtxt or version folder)"
            )
        record = self._records.setdefault(name, ModelRecord(name))
        record.wanted = True
        await self._run(record, "load")

    async def unload(self, name: str) -> None:
        """Stop serving a model and wait for the outcome: new requests are refused, accepted ones finish
        (within the grace period). Runs as its own task, like ``load``; an unload asked for during a load
        makes that load roll back. Raises ModelNotFoundError for a name the server does not know."""
        record = self._records.get(name)
        if record is None:
            try:
                known = name in list_models(self.repo)
            except OSError:
                known = False
            if not known:
                raise ModelNotFoundError(f"unknown model {echo(name)}")
            return
        record.wanted = False
        await self._run(record, "unload")

    async def _run(self, record: ModelRecord, what: str) -> None:
        task = asyncio.get_running_loop().create_task(self._locked(record, what), name=f"{what}-{record.name}")
        self._ops.add(task)
        task.add_done_callback(self._op_done)
        await asyncio.shield(task)

    def _op_done(self, task: asyncio.Task) -> None:
        self._ops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            err = task.exception()
            if not isinstance(err, ServingError):
                log.error("event=lifecycle_error task=%s error=%r", task.get_name(), err, exc_info=err)

    async def _locked(self, record: ModelRecord, what: str) -> None:
        async with record.lock:
            if what == "load":
                if not record.wanted:
                    raise ModelUnavailableError(
                        f"model {record.name!r} was not loaded: an unload was requested after this load"
                    )
                try:
                    await self._load_locked(record)
                except (ServingError, asyncio.CancelledError):
                    raise
                except Exception as err:  # a bug of ours: no version may stay LOADING
                    log.error("event=load_error model=%s error=%r", record.name, err, exc_info=err)
                    self._fail(record, f"internal error while loading ({type(err).__name__})", {})
                    raise ModelLoadError(f"model {record.name!r} failed to load: internal error") from None
            elif not record.wanted:
                await self._unload_locked(record)

    async def _load_locked(self, record: ModelRecord) -> None:
        name = record.name
        model_dir = self.repo / name
        record.fingerprint = await run_blocking(fingerprint, model_dir, name=f"fingerprint-{name}")
        try:
            source = read_model_config(model_dir)
        except RepositoryConfigError as err:
            self._fail(record, str(err), {})
            raise ModelLoadError(self.public(str(err))) from None
        config = source.config
        for setting, how in source.inferred.items():
            log.info("event=config_inferred model=%s config=%s %s=%s", name, source.source, setting, how)
        if source.ignored:
            log.warning("event=config_ignored model=%s config=%s settings=%r", name, source.source, source.ignored)
        available = available_versions(model_dir)
        versions = config.version_policy.select(available)
        if not versions:
            reason = f"no version folder of {name} matches version_policy (found {available})"
            self._fail(record, reason, {})
            raise ModelLoadError(reason)
        serving_before = {v for v, e in record.versions.items() if e.served is not None}
        if not serving_before:
            record.state, record.reason = LOADING, ""
        for version in versions:
            if version not in serving_before:
                record.versions[version] = VersionRecord(version, LOADING)
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(
                run_blocking(
                    load_parts, name, v, model_dir, config, name=f"load-{name}:{v}", on_orphan=LoadedParts.close
                )
                for v in versions
            ),
            return_exceptions=True,
        )
        loaded: dict[int, LoadedParts] = {}
        failed: dict[int, str] = {}
        for version, result in zip(versions, results, strict=True):
            if isinstance(result, BaseException):
                reason = str(result) if isinstance(result, ServingError) else f"{type(result).__name__}: {result}"
                failed[version] = reason
                log.error("event=version_load_failed model=%s version=%d reason=%r", name, version, reason)
            else:
                loaded[version] = result
        if not record.wanted or self.draining:  # the latest request says otherwise: roll back
            for parts in loaded.values():
                run_blocking(parts.close, name=f"close-{name}")
            why = "the server is shutting down" if self.draining else "an unload was requested meanwhile"
            for version in versions:
                if version not in serving_before:
                    record.versions[version] = VersionRecord(version, UNAVAILABLE, UNLOADED)
            if not serving_before:
                record.state, record.reason = UNAVAILABLE, UNLOADED
            log.info("event=load_rolled_back model=%s reason=%r", name, why)
            raise ModelUnavailableError(f"the load of model {name!r} was rolled back: {why}")
        fresh = {
            # parts.config: as served, max_batch_size completed from the model file when the config left it out
            v: ModelVersion(
                name, v, parts.config, parts, self.metrics, loop, model_dir / str(v) / parts.config.model_filename
            )
            for v, parts in loaded.items()
        }
        for version, parts in loaded.items():
            self._log_loaded(name, version, parts.config, parts)
        errors = "; ".join(f"version {v}: {r}" for v, r in failed.items())
        if not fresh:
            self._fail(record, errors, failed)
            raise ModelLoadError(self.public(f"model {name!r} failed to load: {errors}"))
        # Swap: new versions take work from now on; the old ones finish theirs, then close.
        old = {v: e for v, e in record.versions.items() if e.served is not None}
        entries = {v: VersionRecord(v, READY, "", served) for v, served in fresh.items()}
        for version, reason in failed.items():  # a failed reload keeps the version that was serving
            kept = old.pop(version, None)
            entries[version] = kept or VersionRecord(version, UNAVAILABLE, self.public(reason))
        record.versions = entries
        record.state, record.reason = READY, ""
        for entry in old.values():
            assert entry.served is not None
            self._retire(entry.served)
        if failed:
            raise ModelLoadError(self.public(f"model {name!r} loaded partly: {errors}"))

    def _log_loaded(self, name: str, version: int, config, parts: LoadedParts) -> None:
        b = config.dynamic_batching
        log.info(
            "event=loaded model=%s version=%d backend=%s replicas=%s max_batch_size=%d batching=%s "
            "max_queue_delay_us=%d preferred=%s max_queue_size=%d execution_timeout_s=%g seconds=%.2f",
            name,
            version,
            config.backend,
            [f"{p.device}x{p.threads}t" for p in parts.placements],
            config.max_batch_size,
            config.batching,
            b.max_queue_delay_us,
            b.preferred_batch_sizes,
            b.max_queue_size,
            config.execution_timeout_s,
            parts.seconds,
        )

    def _fail(self, record: ModelRecord, reason: str, failed: dict[int, str]) -> None:
        """A load failed entirely: keep serving what was serving (and show why the new versions are not
        served), or show the reason. The server log gets the reason with absolute paths."""
        log.error("event=load_failed model=%s reason=%r", record.name, reason)
        serving = {v: e for v, e in record.versions.items() if e.served is not None}
        if serving:
            record.versions = serving | {
                v: VersionRecord(v, UNAVAILABLE, self.public(r)) for v, r in failed.items() if v not in serving
            }
            return
        record.versions = {}
        record.state, record.reason = UNAVAILABLE, self.public(reason)

    def _retire(self, version: ModelVersion) -> None:
        task = version.retire(self.grace_s, "replaced by a reload")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _unload_locked(self, record: ModelRecord) -> None:
        entries = [e for e in record.versions.values() if e.served is not None]
        for entry in entries:
            entry.state, entry.reason = UNLOADING, ""
            assert entry.served is not None
            entry.served.batcher.stop_accepting()
        await asyncio.gather(*(asyncio.shield(e.served.retire(self.grace_s)) for e in entries if e.served))
        for entry in record.versions.values():
            entry.state, entry.reason, entry.served = UNAVAILABLE, UNLOADED, None
        record.state, record.reason = UNAVAILABLE, UNLOADED
        log.info("event=unloaded model=%s versions=%s", record.name, sorted(record.versions))

    async def drain_all(self, grace_s: float) -> None:
        """Shutdown: load nothing more, finish every accepted request (up to ``grace_s`` seconds), release
        every replica. Each version retires once, whoever else (an unload, a reload) retires it too."""
        self.draining = True
        versions = self.served_versions()
        for version in versions:
            version.batcher.stop_accepting()
        tasks = [version.retire(grace_s, "stopped by the server's shutdown") for version in versions]
        tasks += list(self._retiring)
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s + 1.0)

    async def poll(self, interval_s: float) -> None:
        """Reload models whose files changed, load new ones, unload removed ones (``--poll``).

        Never ends on an error: an unexpected one is logged and the next round runs as usual."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._poll_once()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("event=poll_failed action=continue")

    async def _poll_once(self) -> None:
        present = set(await run_blocking(list_models, self.repo, name="poll"))
        for name in sorted(present):
            if self.draining:
                return
            record = self._records.get(name)
            current = await run_blocking(fingerprint, self.repo / name, name="poll")
            if record is None or current != record.fingerprint:
                try:
                    await self.load(name)
                    log.info("event=reloaded model=%s cause=poll", name)
                except ServingError as err:
                    log.error("event=reload_failed model=%s reason=%r", name, str(err))
        for name in set(self._records) - present:
            if self._records[name].serving():
                await self.unload(name)
