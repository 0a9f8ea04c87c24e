"""Assemble and run the single-process server: two front-ends over one data plane, metrics, signals, drain.

The engine (the ModelManager: models, batchers, replicas) sits behind a ``LocalEngine``; one ``DataPlane``
holds the request rules; the gRPC front-end (inference, health, reflection) and the HTTP/REST front-end
(``http_port``; 0 disables it) only convert their wire formats (``listeners.Listeners``). Both share the
event loop. This is ``tensorwire serve --workers 1``; ``--workers N`` runs the same listeners in N front-end
processes in front of one engine process (``tensorwire.server.workers``).

Health: see ``listeners``; the app refreshes the statuses every second and after each load or unload.

Shutdown: on SIGTERM/SIGINT, at any moment (the start-up load included), readiness flips to NOT_SERVING
first and no model is loaded any more; the server keeps serving for ``drain_s`` so load balancers
notice; then new inference is refused with UNAVAILABLE, everything accepted is finished (up to
``grace_s``, a hung model included: its replicas are abandoned), and the process exits 0. Loads
still running in their threads are abandoned too; nothing keeps the process past the grace period.

Memory: inference calls in flight are charged against one server-wide budget
(``max_inflight_bytes``, enforced by the servicer when it reads a request), and
no single message may exceed it; calls that fail authentication are refused
before their message is read (see auth).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from tensorwire.server.budget import InflightBudget, default_budget_bytes
from tensorwire.server.dataplane import DataPlane
from tensorwire.server.engine import LocalEngine
from tensorwire.server.listeners import MAX_MESSAGE_BYTES, Listeners, ServerSettings, http_ssl_context
from tensorwire.server.manager import ModelManager
from tensorwire.server.metrics_http import start_metrics_server
from tensorwire.server.stats import Metrics

__all__ = ["MAX_MESSAGE_BYTES", "InferenceServer", "ServerSettings", "http_ssl_context"]

log = logging.getLogger("tensorwire.server")


class InferenceServer:
    """One running tensorwire server in one process (``--workers 1``)."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.budget = InflightBudget(settings.max_inflight_bytes or default_budget_bytes())
        self.metrics.watch_budget(lambda: self.budget.in_use, self.budget.limit)
        #: The largest message either way: the configured limit, but never more than the budget holds.
        self.max_message_bytes = min(settings.max_message_bytes, self.budget.limit)
        self.manager = ModelManager(
            settings.repo, self.metrics, settings.grace_s, strict_readiness=settings.strict_readiness
        )
        self.engine = LocalEngine(self.manager)
        self.dataplane = DataPlane(self.engine, self.budget, on_repository_change=self._sync_health)
        self.listeners = Listeners(settings, self.dataplane, self.max_message_bytes)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def _sync_health(self) -> None:
        """Refresh the health statuses, and drop the statistics and metric series of versions no longer
        served."""
        self.listeners.sync_health()
        served = {(v.name, str(v.version)) for v in self.manager.served_versions()}
        for model, version in self.metrics.retain(served):
            log.info("event=metrics_removed model=%s version=%s", model, version)

    async def _health_loop(self) -> None:
        while True:
            self._sync_health()
            await asyncio.sleep(1.0)

    async def run(self) -> int:
        """Serve until a signal; returns the process exit code.

        A signal during the start-up load begins the shutdown at once: the loads still running are
        rolled back (or abandoned with their threads when they outlast the process)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if self.settings.metrics_port:
            start_metrics_server(self.settings.metrics_port, self.settings.host, self.metrics.registry)
        self.manager.announce()
        await self.listeners.start()
        self._tasks.append(loop.create_task(self._health_loop()))
        log.info(
            "event=listening grpc=%s:%d http_port=%d metrics_port=%d tls=%s auth=%s strict_readiness=%s "
            "max_inflight_bytes=%d max_message_bytes=%d workers=1",
            self.settings.host,
            self.settings.grpc_port,
            self.settings.http_port,
            self.settings.metrics_port,
            bool(self.settings.tls_cert),
            bool(self.settings.auth_token),
            self.settings.strict_readiness,
            self.budget.limit,
            self.max_message_bytes,
        )
        loading = loop.create_task(self.manager.load_all())
        stopping = loop.create_task(self._stopping.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not self._stopping.is_set():
            self.dataplane.started = True
            self._sync_health()
            if self.settings.poll_s:
                self._tasks.append(loop.create_task(self.manager.poll(self.settings.poll_s)))
            log.info("event=ready models=%s", [f"{n}:{v}:{s}" for n, v, s, _ in self.manager.index()])
            self.manager.warn_not_ready()
            await stopping
        else:
            log.info("event=stop_during_startup detail='loads still running are rolled back or abandoned'")
            loading.cancel()
        await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        """Drain window, then finish accepted work within the grace period, then stop gRPC."""
        s = self.settings
        loop = asyncio.get_running_loop()
        log.info("event=draining drain_s=%.1f grace_s=%.1f", s.drain_s, s.grace_s)
        self.dataplane.draining = True
        self.manager.draining = True  # from now on nothing is loaded; loads in flight roll back
        self._sync_health()
        await asyncio.sleep(s.drain_s)  # still serving: let load balancers see NOT_SERVING
        for task in self._tasks:
            task.cancel()
        deadline = loop.time() + s.grace_s
        await self.manager.drain_all(s.grace_s)
        await self.listeners.stop(min(1.0, deadline - loop.time()))
        log.info("event=stopped")
