"""``tensorwire serve --workers N``: N front-end processes in front of one engine process.

A Python process spends most of its serving time in grpcio's binding and the event loop, under one GIL: it
tops out near one core whatever the host has. With ``--workers N`` the process started by ``tensorwire
serve`` becomes the *engine process*: it holds the ModelManager, every model's batcher and replicas, the
metrics endpoint and the drain; it starts N *front-end processes* (:mod:`tensorwire.server.frontend_process`),
each listening on the same gRPC and HTTP ports (``SO_REUSEPORT``: the kernel spreads connections across
them), validating and decoding requests in its own interpreter, and sending the decoded tensors to the
engine over a Unix-domain socket (:mod:`tensorwire.server.ipc`). A batch still forms across every
connection of every front-end, and each device holds each model once. This is the shape of Triton's
Python-backend stubs, vLLM's API-server / engine-core split and TorchServe's front-end / worker split,
turned around: the front-ends are the processes that multiply, because the request path, not the model, is
what a Python server runs out of.

Failures, decided here:

- a front-end that exits unexpectedly is logged (``event=frontend_exited``) and started again (its
  requests still queued in the engine are withdrawn: their connections went with it); more than
  ``MAX_RESTARTS`` exits within ``RESTART_WINDOW_S`` seconds is a crash loop: the server logs
  ``event=frontend_crash_loop``, drains and exits 1, so that the supervisor above it (Kubernetes, systemd)
  sees a failed server rather than one that flaps;
- a front-end that cannot listen at start-up (a port taken) ends the start-up: exit 1, the front-end's own
  line naming the port;
- the engine is this process: if it dies, every front-end sees its standard input close, logs
  ``event=engine_lost`` and exits 1 at once, and this process's own exit status (a signal's, or 1) is the
  server's.

Shutdown (SIGTERM/SIGINT to this process): readiness turns NOT_SERVING on every front-end at once, the
server keeps serving for ``drain_s``, then the batchers refuse new work and finish what they
accepted (up to ``grace_s``), then each front-end closes its ports once the answers are written, and
the process exits 0.

Memory budget: one budget for the server, shared by the front-ends through a small shared-memory file of
per-process counters (``budget.SharedBudget``); ``/metrics`` reports their sum.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tensorwire.server.budget import default_budget_bytes
from tensorwire.server.engine_service import EngineService
from tensorwire.server.listeners import ServerSettings, settings_to_dict
from tensorwire.server.manager import ModelManager
from tensorwire.server.metrics_http import start_metrics_server
from tensorwire.server.model_version import cpu_cores
from tensorwire.server.stats import Metrics

log = logging.getLogger("tensorwire.server")

#: Front-end exits within ``RESTART_WINDOW_S`` beyond which the server gives up (drains and exits 1).
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
#: How long the engine waits for front-ends to report that they listen before the start-up fails.
LISTEN_TIMEOUT_S = 60.0
#: After STOP, how long a front-end may take to exit before it is killed.
EXIT_TIMEOUT_S = 5.0
#: How long a polled (not pidfd-watched) front-end's exit may go unnoticed.
POLL_EXIT_S = 0.2


def default_workers(cores: int | None = None) -> int:
    """The front-end processes ``tensorwire serve`` runs without ``--workers``.

    ``cores``: the cores this process may use (default: its CPU affinity). Measured on a 2-core machine
    (BENCHMARKS.md, "Front-end processes"): one process is the fastest choice there for a single heavy
    client (the engine's model threads need the second core), so 2 cores or fewer get 1; with more cores each
    front-end process can have a core of its own beside the engine: one per 2 cores beyond the first 2,
    at most 8 (a perf_analyzer's 3 connections spread over at most 3 front-ends anyway; many clients
    spread further).
    """
    cores = cpu_cores() if cores is None else cores
    if cores <= 2:
        return 1
    return max(1, min(8, (cores - 2) // 2 + 1))


@dataclass
class Frontend:
    """One front-end slot: its process of the moment, and when its processes exited unexpectedly."""

    index: int
    generation: int = 0
    process: subprocess.Popen | None = None
    listening: bool = False
    expected_exit: bool = False
    exits: collections.deque = field(default_factory=collections.deque)
    pidfd: int | None = None


class FrontendCollector:
    """Prometheus process metrics of every front-end process (``tensorwire_frontend_process_*`` with a
    ``frontend`` label), read from /proc at scrape time with prometheus-client's own process collector."""

    def __init__(self, server: MultiProcessServer) -> None:
        self._server = server
        self._collectors: dict[int, ProcessCollector] = {}

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        live: set[int] = set()
        for frontend in self._server.frontends:
            process = frontend.process
            if process is None or process.poll() is not None:
                continue
            pid = process.pid
            live.add(pid)
            collector = self._collectors.get(pid)
            if collector is None:
                collector = self._collectors[pid] = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
            for family in collector.collect():
                name = f"tensorwire_frontend_{family.name}"
                target = families.get(name)
                if target is None:
                    kind = CounterMetricFamily if family.type == "counter" else GaugeMetricFamily
                    target = families[name] = kind(
                        name, f"{family.documentation} (per front-end process)", labels=["frontend"]
                    )
                for sample in family.samples:
                    target.add_metric([str(frontend.index)], sample.value)
        for pid in set(self._collectors) - live:
            del self._collectors[pid]
        yield from families.values()


class MultiProcessServer:
    """The engine process of ``tensorwire serve --workers N`` (N = ``settings.workers`` ≥ 2): see the module
    docstring."""

    def __init__(self, settings: ServerSettings, log_level: str = "INFO") -> None:
        self.settings = settings
        self.log_level = log_level
        self.metrics = Metrics()
        self.budget_limit = settings.max_inflight_bytes or default_budget_bytes()
        #: The largest message either way: the configured limit, but never more than the budget holds.
        self.max_message_bytes = min(settings.max_message_bytes, self.budget_limit)
        self.runtime = Path(tempfile.mkdtemp(prefix="tensorwire-"))  # mode 0700: only this user connects
        self.socket_path = str(self.runtime / "engine.sock")
        self.budget_path = self.runtime / "budget"
        self.budget_path.write_bytes(bytes(8 * settings.workers))
        with open(self.budget_path, "r+b") as file:
            self._shared = mmap.mmap(file.fileno(), 0)
        self._slots = memoryview(self._shared).cast("q")
        self.metrics.watch_budget(lambda: sum(self._slots), self.budget_limit)
        self.restarts = Counter(
            "tensorwire_frontend_restarts",
            "Front-end processes started again after they exited unexpectedly",
            registry=self.metrics.registry,
        )
        self.metrics.registry.register(FrontendCollector(self))
        self.manager = ModelManager(
            settings.repo, self.metrics, settings.grace_s, strict_readiness=settings.strict_readiness
        )
        self.frontends = [Frontend(index) for index in range(settings.workers)]
        self.service: EngineService | None = None
        self._stopping = asyncio.Event()
        self._listening = asyncio.Event()
        self._failed_start = ""
        self._exit_code = 0
        self._shutting_down = False
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------ front-ends

    def _spawn(self, frontend: Frontend) -> None:
        """Start ``frontend``'s next process; its configuration goes in on standard input, which stays open."""
        frontend.generation += 1
        frontend.listening = False
        frontend.expected_exit = False
        self._slots[frontend.index] = 0  # whatever a previous process held went with it
        config = {
            "index": frontend.index,
            "socket": self.socket_path,
            "settings": settings_to_dict(self.settings),
            "budget_path": str(self.budget_path),
            "budget_limit": self.budget_limit,
            "max_message_bytes": self.max_message_bytes,
            "log_level": self.log_level,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorwire.server.frontend_process"], stdin=subprocess.PIPE, close_fds=True
        )
        assert process.stdin is not None
        process.stdin.write(json.dumps(config).encode() + b"\n")
        process.stdin.flush()
        frontend.process = process
        self._watch(frontend)
        log.info("event=frontend_started index=%d pid=%d", frontend.index, process.pid)

    def _watch(self, frontend: Frontend) -> None:
        """Call ``_exited`` as soon as ``frontend``'s process ends (a pidfd on Linux ≥ 5.3, else polling)."""
        loop = asyncio.get_running_loop()
        process = frontend.process
        assert process is not None
        try:
            frontend.pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):
            frontend.pidfd = None

            async def poll() -> None:
                while process.poll() is None:
                    await asyncio.sleep(POLL_EXIT_S)
                self._exited(frontend, process)

            self._tasks.append(loop.create_task(poll()))
            return
        loop.add_reader(frontend.pidfd, self._exited, frontend, process)

    def _exited(self, frontend: Frontend, process: subprocess.Popen) -> None:
        if frontend.pidfd is not None and frontend.process is process:
            asyncio.get_running_loop().remove_reader(frontend.pidfd)
            os.close(frontend.pidfd)
            frontend.pidfd = None
        code = process.wait()
        if process.stdin is not None:
            try:
                process.stdin.close()
            except OSError:
                pass
        if frontend.process is not process:
            return
        frontend.process = None
        withdrawn = self.service.frontend_exited(process.pid) if self.service else 0
        self._slots[frontend.index] = 0
        if frontend.expected_exit:
            return
        if not frontend.listening and not self._listening.is_set():
            self._failed_start = f"front-end {frontend.index} exited with {code} before listening"
            log.error("event=frontend_start_failed index=%d pid=%d code=%d", frontend.index, process.pid, code)
            self._exit_code = 1
            self._stopping.set()
            return
        now = time.monotonic()
        frontend.exits.append(now)
        while frontend.exits and frontend.exits[0] < now - RESTART_WINDOW_S:
            frontend.exits.popleft()
        if self._shutting_down:
            log.error(
                "event=frontend_exited index=%d pid=%d code=%d withdrawn=%d action=none detail='draining'",
                frontend.index,
                process.pid,
                code,
                withdrawn,
            )
            return
        if len(frontend.exits) > MAX_RESTARTS:
            log.error(
                "event=frontend_crash_loop index=%d exits=%d window_s=%.0f action=drain_and_exit code=1",
                frontend.index,
                len(frontend.exits),
                RESTART_WINDOW_S,
            )
            self._exit_code = 1
            self._stopping.set()
            return
        log.error(
            "event=frontend_exited index=%d pid=%d code=%d withdrawn=%d action=restart",
            frontend.index,
            process.pid,
            code,
            withdrawn,
        )
        self.restarts.inc()
        self._spawn(frontend)

    def _on_listening(self, index: int) -> None:
        self.frontends[index].listening = True
        if all(frontend.listening for frontend in self.frontends):
            self._listening.set()

    # --------------------------------------------------------------- serving

    async def run(self) -> int:
        """Serve until a signal (exit 0), a failed start-up or a front-end crash loop (exit 1)."""
        try:
            return await self._run()
        finally:
            self._cleanup()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        s = self.settings
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if s.metrics_port:
            start_metrics_server(s.metrics_port, s.host, self.metrics.registry)
        self.manager.announce()
        self.service = EngineService(
            self.manager, self.metrics, self.socket_path, loop, on_listening=self._on_listening
        )
        await self.service.start()
        for frontend in self.frontends:
            self._spawn(frontend)
        stopping = loop.create_task(self._stopping.wait())
        listening = loop.create_task(self._listening.wait())
        await asyncio.wait({stopping, listening}, timeout=LISTEN_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if not self._listening.is_set():
            if not self._stopping.is_set():
                self._failed_start = f"the front-ends did not listen within {LISTEN_TIMEOUT_S:.0f} s"
            if self._failed_start:
                log.error("event=start_failed error=%r", self._failed_start)
                self._exit_code = 1
            listening.cancel()
            await self._stop_frontends(0.0)
            return self._exit_code
        self._tasks.append(loop.create_task(self.service.publish_loop()))
        self._tasks.append(loop.create_task(self._retain_loop()))
        log.info(
            "event=listening grpc=%s:%d http_port=%d metrics_port=%d tls=%s auth=%s strict_readiness=%s "
            "max_inflight_bytes=%d max_message_bytes=%d workers=%d engine_pid=%d",
            s.host,
            s.grpc_port,
            s.http_port,
            s.metrics_port,
            bool(s.tls_cert),
            bool(s.auth_token),
            s.strict_readiness,
            self.budget_limit,
            self.max_message_bytes,
            s.workers,
            os.getpid(),
        )
        loading = loop.create_task(self.manager.load_all())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not self._stopping.is_set():
            self.service.started = True
            self.service.publish()
            if s.poll_s:
                self._tasks.append(loop.create_task(self.manager.poll(s.poll_s)))
            log.info("event=ready models=%s", [f"{n}:{v}:{st}" for n, v, st, _ in self.manager.index()])
            self.manager.warn_not_ready()
            await stopping
        else:
            log.info("event=stop_during_startup detail='loads still running are rolled back or abandoned'")
            loading.cancel()
        await self.shutdown()
        return self._exit_code

    async def _retain_loop(self) -> None:
        """Drop the statistics and metric series of versions no longer served (every second)."""
        while True:
            served = {(v.name, str(v.version)) for v in self.manager.served_versions()}
            for model, version in self.metrics.retain(served):
                log.info("event=metrics_removed model=%s version=%s", model, version)
            await asyncio.sleep(1.0)

    async def shutdown(self) -> None:
        """Readiness off everywhere, the drain window, finish accepted work within the grace period, then
        close the front-ends' ports and wait for them to exit."""
        s = self.settings
        loop = asyncio.get_running_loop()
        assert self.service is not None
        self._shutting_down = True
        log.info("event=draining drain_s=%.1f grace_s=%.1f", s.drain_s, s.grace_s)
        self.service.draining = True
        self.manager.draining = True  # from now on nothing is loaded; loads in flight roll back
        await self.service.publish_acknowledged()
        await asyncio.sleep(s.drain_s)  # still serving: let load balancers see NOT_SERVING
        deadline = loop.time() + s.grace_s
        await self.manager.drain_all(s.grace_s)
        await self._stop_frontends(min(1.0, deadline - loop.time()))
        for task in self._tasks:
            task.cancel()
        log.info("event=stopped code=%d", self._exit_code)

    async def _stop_frontends(self, grace_s: float) -> None:
        """STOP every front-end (answers in flight get ``grace_s``), wait for them to exit, kill stragglers."""
        for frontend in self.frontends:
            frontend.expected_exit = True
        if self.service is not None:
            self.service.stop_frontends(max(0.1, grace_s))
        deadline = time.monotonic() + max(0.1, grace_s) + EXIT_TIMEOUT_S
        for frontend in self.frontends:
            process = frontend.process
            if process is None:
                continue
            if not self._listening.is_set() and not frontend.listening:
                process.kill()  # never got going: nothing to finish
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if process.poll() is None:
                log.warning(
                    "event=frontend_killed index=%d pid=%d detail='no exit after STOP'", frontend.index, process.pid
                )
                process.kill()
                process.wait()

    def _cleanup(self) -> None:
        if self.service is not None:
            self.service.close()
        self._slots.release()
        self._shared.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
