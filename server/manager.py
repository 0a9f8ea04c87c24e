"""The model manager: which models and versions exist, their states, and load/unload.

Explicit model control (Triton's ``--model-control-mode=explicit`` plus load-all at
start): everything in the repository is loaded at start; afterwards only
RepositoryModelLoad/Unload (or ``--poll``) change what is served. A reload brings
the new versions up and warms them before the old ones stop taking work, so a
rollout fails no request. A model that fails to load never stops the others: it
shows as UNAVAILABLE with its reason.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tensorwire.repository import (
    ModelConfigFile,
    RepositoryConfigError,
    available_versions,
    check_model_name,
    is_model_folder,
    list_models,
    read_model_config,
)
from tensorwire.server.errors import (
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
    ServingError,
)
from tensorwire.server.model_version import LOADING, READY, UNAVAILABLE, UNLOADING, ModelVersion, load_parts
from tensorwire.server.stats import Metrics

log = logging.getLogger("tensorwire.manager")


@dataclass
class ModelRecord:
    """Everything known about one model name."""

    name: str
    config: ModelConfigFile | None = None
    versions: dict[int, ModelVersion] = field(default_factory=dict)  # serving now
    states: dict[int, tuple[str, str]] = field(default_factory=dict)  # version -> (state, reason)
    state: str = UNAVAILABLE  # of the model as a whole, for versionless index rows
    reason: str = "not loaded"
    fingerprint: tuple = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def fingerprint(model_dir: Path) -> tuple:
    """Changes whenever the config or any version's files change (for --poll)."""
    entries = []
    for path in sorted(model_dir.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(model_dir).parts):
            stat = path.stat()
            entries.append((str(path.relative_to(model_dir)), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


class ModelManager:
    """Owns every ModelVersion; resolves names for the servicer."""

    def __init__(self, repo: Path, metrics: Metrics, grace_seconds: float = 30.0) -> None:
        self.repo = Path(repo)
        self.metrics = metrics
        self.grace_seconds = grace_seconds
        self._records: dict[str, ModelRecord] = {}
        self._retiring: set[asyncio.Task] = set()

    # ------------------------------------------------------------ queries

    def resolve(self, name: str, version: str = "") -> ModelVersion:
        """The version to serve a request: NOT_FOUND if absent, UNAVAILABLE if not ready."""
        record = self._records.get(name)
        if record is None:
            raise ModelNotFoundError(
                f"unknown model {name!r}; RepositoryIndex lists the models this server has"
            )
        if version:
            if not (version.isascii() and version.isdigit()):  # str.isdigit alone admits '²', '١'...
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version!r}; versions are positive integers"
                )
            served = record.versions.get(int(version))
            if served is not None and served.state == READY:
                return served
            state, reason = record.states.get(int(version), ("", ""))
            if state in (LOADING, UNLOADING):
                raise ModelUnavailableError(
                    f"model {name!r} version {version} is {state.lower()}; retry shortly"
                )
            if served is None and not state:
                raise ModelNotFoundError(
                    f"model {name!r} has no version {version}; ready versions: {self.ready_versions(name)}"
                )
            raise ModelUnavailableError(f"model {name!r} version {version} is not ready: {reason or state}")
        ready = [v for v in record.versions.values() if v.state == READY]
        if ready:
            return max(ready, key=lambda v: v.version)
        if record.state in (LOADING, UNLOADING):
            raise ModelUnavailableError(f"model {name!r} is {record.state.lower()}; retry shortly")
        raise ModelUnavailableError(f"model {name!r} is not ready: {record.reason}")

    def ready_versions(self, name: str) -> list[int]:
        record = self._records.get(name)
        if record is None:
            return []
        return sorted(v.version for v in record.versions.values() if v.state == READY)

    def served_versions(self) -> list[ModelVersion]:
        return [v for record in self._records.values() for v in record.versions.values()]

    def all_ready(self) -> bool:
        """Server readiness: every model that is supposed to serve has a ready version."""
        return all(
            any(v.state == READY for v in record.versions.values())
            for record in self._records.values()
            if record.state == READY
        )

    def index(self, repository_models: bool = True) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) rows, as RepositoryIndex reports them."""
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
                rows.append((name, "", UNAVAILABLE, "not loaded"))
                continue
            if not record.states:
                rows.append((name, "", record.state, record.reason))
            for version, (state, reason) in sorted(record.states.items()):
                rows.append((name, str(version), state, reason))
        return rows

    # ---------------------------------------------------------- lifecycle

    def announce(self) -> None:
        """Record every repository model as LOADING, so that calls before load_all finishes
        get UNAVAILABLE ("loading, retry") rather than NOT_FOUND."""
        for name in list_models(self.repo) if self.repo.is_dir() else []:
            self._records.setdefault(name, ModelRecord(name, state=LOADING, reason="server starting"))

    async def load_all(self) -> None:
        """Load every model in the repository; failures are recorded, not raised."""
        names = list_models(self.repo) if self.repo.is_dir() else []
        if not names:
            log.warning("event=empty_repository repo=%s", self.repo)
        for name in names:
            try:
                await self.load(name)
            except ServingError as err:
                log.error("event=load_failed model=%s reason=%r", name, str(err))

    async def load(self, name: str) -> None:
        """(Re)load a model from the repository; raises ModelLoadError/ModelNotFoundError on failure."""
        try:
            check_model_name(name)
        except RepositoryConfigError as err:
            raise ModelNotFoundError(str(err)) from None
        model_dir = self.repo / name
        if not is_model_folder(model_dir):
            raise ModelNotFoundError(
                f"model {name!r} is not in the repository {self.repo} "
                f"(no {name}/ folder with a config.toml, config.pbtxt or version folder)"
            )
        record = self._records.setdefault(name, ModelRecord(name))
        async with record.lock:
            await self._load_locked(record, model_dir)

    async def _load_locked(self, record: ModelRecord, model_dir: Path) -> None:
        name = record.name
        record.fingerprint = await asyncio.to_thread(fingerprint, model_dir)
        try:
            source = read_model_config(model_dir)
        except RepositoryConfigError as err:
            self._mark_failed(record, str(err))
            raise ModelLoadError(str(err)) from None
        config = source.config
        for setting, how in source.inferred.items():
            log.info("event=config_inferred model=%s config=%s %s=%s", name, source.source, setting, how)
        if source.ignored:
            log.warning("event=config_ignored model=%s config=%s settings=%r", name, source.source, source.ignored)
        versions = config.version_policy.select(available_versions(model_dir))
        if not versions:
            reason = (
                f"no version folder of {name} matches version_policy (found {available_versions(model_dir)})"
            )
            self._mark_failed(record, reason)
            raise ModelLoadError(reason)
        if not record.versions:
            record.state, record.reason = LOADING, ""
        for version in versions:
            if version not in record.versions:
                record.states[version] = (LOADING, "")
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(asyncio.to_thread(load_parts, name, v, model_dir, config) for v in versions),
            return_exceptions=True,
        )
        fresh: dict[int, ModelVersion] = {}
        failed: dict[int, str] = {}
        for version, result in zip(versions, results, strict=True):
            if isinstance(result, BaseException):
                reason = (
                    str(result) if isinstance(result, ServingError) else f"{type(result).__name__}: {result}"
                )
                failed[version] = reason
                log.error("event=version_load_failed model=%s version=%d reason=%r", name, version, reason)
                continue
            served = result.config  # completed from the model file (max_batch_size)
            fresh[version] = ModelVersion(name, version, served, result, self.metrics, loop)
            b = served.dynamic_batching
            log.info(
                "event=loaded model=%s version=%d backend=%s replicas=%s max_batch_size=%d batching=%s "
                "max_queue_delay_us=%d preferred=%s max_queue_size=%d seconds=%.2f",
                name,
                version,
                served.backend,
                [f"{p.device}x{p.threads}t" for p in result.placements],
                served.max_batch_size,
                served.batching,
                b.max_queue_delay_us,
                b.preferred_batch_sizes,
                b.max_queue_size,
                result.seconds,
            )
        errors = "; ".join(f"version {v}: {r}" for v, r in failed.items())
        old = dict(record.versions)
        for version in failed:  # a failed reload keeps the version that was serving
            if version in old:
                fresh[version] = old.pop(version)
        if not fresh:
            self._mark_failed(record, errors, failed)
            raise ModelLoadError(f"model {name!r} failed to load: {errors}")
        # Swap: new versions take work from now on; the old ones finish theirs, then close.
        record.versions = fresh
        record.config = config
        record.state, record.reason = READY, ""
        record.states = {v: (READY, "") for v in fresh} | {
            v: (UNAVAILABLE, r) for v, r in failed.items() if v not in fresh
        }
        for retired in old.values():
            self._retire(retired)
        if failed:
            raise ModelLoadError(f"model {name!r} loaded partly: {errors}")

    def _mark_failed(self, record: ModelRecord, reason: str, failed: dict[int, str] | None = None) -> None:
        """A load failed entirely: keep serving what was serving (and show why the new versions
        are not served), or show the reason."""
        if record.versions:
            record.states = {v: (READY, "") for v in record.versions} | {
                v: (UNAVAILABLE, r) for v, r in (failed or {}).items() if v not in record.versions
            }
            return
        record.state, record.reason = UNAVAILABLE, reason
        record.states = {}

    def _retire(self, version: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(version.retire(self.grace_seconds))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def unload(self, name: str) -> None:
        """Stop serving a model: new requests are refused, accepted ones finish."""
        record = self._records.get(name)
        if record is None or not record.versions:
            if record is None and name not in list_models(self.repo):
                raise ModelNotFoundError(f"unknown model {name!r}")
            return
        async with record.lock:
            versions = list(record.versions.values())
            record.state, record.reason = UNLOADING, ""
            for version in versions:
                version.batcher.stop_accepting()
                version.state = UNLOADING
                record.states[version.version] = (UNLOADING, "")
            await asyncio.gather(*(v.retire(self.grace_seconds) for v in versions))
            record.versions = {}
            record.state, record.reason = UNAVAILABLE, "unloaded"
            for version in versions:
                record.states[version.version] = (UNAVAILABLE, "unloaded")
            log.info("event=unloaded model=%s versions=%s", name, [v.version for v in versions])

    def stop_accepting(self) -> None:
        for version in self.served_versions():
            version.batcher.stop_accepting()

    async def drain_all(self, grace_seconds: float) -> None:
        """Finish every accepted request (shutdown)."""
        versions = self.served_versions()
        for version in versions:
            version.batcher.stop_accepting()
        await asyncio.gather(*(v.retire(grace_seconds) for v in versions), *self._retiring)

    async def poll(self, interval: float) -> None:
        """Reload models whose files changed, load new ones, unload removed ones (``--poll``)."""
        while True:
            await asyncio.sleep(interval)
            try:
                present = set(await asyncio.to_thread(list_models, self.repo))
            except OSError:
                continue
            for name in sorted(present):
                record = self._records.get(name)
                current = await asyncio.to_thread(fingerprint, self.repo / name)
                if record is None or current != record.fingerprint:
                    try:
                        await self.load(name)
                        log.info("event=reloaded model=%s cause=poll", name)
                    except ServingError as err:
                        log.error("event=reload_failed model=%s reason=%r", name, str(err))
            for name in set(self._records) - present:
                if self._records[name].versions:
                    await self.unload(name)
