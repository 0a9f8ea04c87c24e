"""Assemble and run the server: two front-ends over one data plane, metrics, signals, drain.

The engine (the ModelManager: models, batchers, replicas) sits behind a ``LocalEngine``; one ``DataPlane``
holds the request rules; the gRPC front-end (inference, health, reflection) and the HTTP/REST front-end
(``http_port``; 0 disables it) only convert their wire formats. Both share the event loop.

Health: liveness and readiness mean different things. Live = the process serves requests, also while
models load and while it drains (gRPC health service ``""``, ``ServerLive``, HTTP ``/v2/health/live``):
a liveness probe must never restart a pod that is busy loading or shutting down cleanly. Ready = the
start-up load is done, the server is not draining and the models are ready (strict readiness by default)
(gRPC health service ``inference.GRPCInferenceService``, ``ServerReady``, HTTP ``/v2/health/ready``);
each model's name is a health service too (that model has a READY version and the server is not draining).

Shutdown: on SIGTERM/SIGINT, at any moment (the start-up load included), readiness flips to NOT_SERVING
first and no model is loaded any more; the server keeps serving for ``drain_seconds`` so load balancers
notice; then new inference is refused with UNAVAILABLE, everything accepted is finished (up to
``grace_seconds``, a hung model included: its replicas are abandoned), and the process exits 0. Loads
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
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tensorwire.proto.service import SERVICE_NAME, standard_descriptor_pool
from tensorwire.server.auth import TokenAuthInterceptor
from tensorwire.server.budget import InflightBudget, default_budget_bytes
from tensorwire.server.dataplane import DataPlane
from tensorwire.server.engine import LocalEngine
from tensorwire.server.http_frontend import HttpFrontend
from tensorwire.server.manager import ModelManager
from tensorwire.server.metrics_http import start_metrics_server
from tensorwire.server.servicer import Servicer
from tensorwire.server.standard_services import health_handler, reflection_handler
from tensorwire.server.stats import Metrics

log = logging.getLogger("tensorwire.server")

MAX_MESSAGE_BYTES = 2**31 - 1


@dataclass
class ServerSettings:
    """Everything ``tensorwire serve`` can be told."""

    repo: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    http_port: int = 8000  # the v2 REST front-end (Triton's default port); 0 disables it
    metrics_port: int = 8002  # 0 disables the metrics endpoint
    max_message_bytes: int = MAX_MESSAGE_BYTES  # capped at max_inflight_bytes
    max_inflight_bytes: int | None = None  # None: default_budget_bytes() (a quarter of the memory limit)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # set: clients must present a certificate it signed (mutual TLS)
    auth_token: str | None = None
    drain_seconds: float = 2.0
    grace_seconds: float = 30.0
    poll_seconds: float = 0.0  # 0: explicit model control only
    strict_readiness: bool = True  # ServerReady needs every model READY (Triton's default)


def http_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The HTTP front-end's TLS context: the gRPC port's certificate and key; with a client CA, client
    certificates are verified when presented (CERT_OPTIONAL) and required by the front-end on every path but
    health, so that Kubernetes' HTTPS probes (which present none) still reach /v2/health/*."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(cafile=str(settings.tls_client_ca))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Our service under its standard name, plus health and reflection, for server reflection."""
    pool = descriptor_pool.DescriptorPool()
    for file in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
    proto = descriptor_pb2.FileDescriptorProto()
    standard_descriptor_pool().FindFileContainingSymbol(SERVICE_NAME).CopyToProto(proto)
    pool.Add(proto)
    return pool


class InferenceServer:
    """One running tensorwire server."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.budget = InflightBudget(settings.max_inflight_bytes or default_budget_bytes())
        self.metrics.watch_budget(lambda: self.budget.in_use, self.budget.limit)
        #: The largest message either way: the configured limit, but never more than the budget holds.
        self.max_message_bytes = min(settings.max_message_bytes, self.budget.limit)
        self.manager = ModelManager(
            settings.repo, self.metrics, settings.grace_seconds, strict_readiness=settings.strict_readiness
        )
        self.health = health.aio.HealthServicer()
        self.engine = LocalEngine(self.manager)
        self.dataplane = DataPlane(self.engine, self.budget, on_repository_change=self._sync_health)
        self.servicer = Servicer(self.dataplane)
        self.http: HttpFrontend | None = None
        self._stopping = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._health_names: set[str] = set()

    def _build(self) -> grpc.aio.Server:
        s = self.settings
        interceptors = []
        if s.auth_token:
            refused = self.metrics.refuse
            interceptors.append(TokenAuthInterceptor(s.auth_token, lambda method: refused(method, "unauthenticated")))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
                # Let clients keep idle connections alive with pings (every 10 s at most).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        # Only ModelInfer, one call per request, is a registered method (gRPC matches its path in C, without a
        # Python lookup per call). Not every method: grpc.aio's server loop keeps one pending future per
        # registered method and asyncio.wait()s on all of them for every incoming call; with all 13
        # registered that cost ~60k more instructions per ModelInfer (callgrind, grpcio 1.85) than this.
        handlers = self.servicer.method_handlers()
        server.add_registered_method_handlers(SERVICE_NAME, {"ModelInfer": handlers.pop("ModelInfer")})
        refuse = self.servicer.refuse_malformed
        services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),
                health_handler(self.health, refuse),
                reflection_handler(services, reflection_pool(), refuse),
            )
        )
        address = f"{s.host}:{s.grpc_port}"
        try:
            if s.tls_cert and s.tls_key:
                credentials = grpc.ssl_server_credentials(
                    [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                    root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
                    require_client_auth=s.tls_client_ca is not None,
                )
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError as err:  # grpcio's "Failed to bind to address ..."
            raise OSError(f"cannot listen on {address} (--grpc-port): {err}") from err
        if not bound:
            raise OSError(f"cannot listen on {address} (--grpc-port)")
        return server

    def _sync_health(self) -> None:
        """Health statuses: '' is liveness (SERVING while the process serves), the inference service's name
        readiness, each model's name that model's readiness. Also drops the statistics and metric series of
        versions no longer served."""
        dataplane = self.dataplane
        serving = dataplane.started and not dataplane.draining
        status = health_pb2.HealthCheckResponse
        live = status.SERVING if dataplane.live() else status.NOT_SERVING
        ready = status.SERVING if dataplane.ready() else status.NOT_SERVING
        loop = asyncio.get_running_loop()
        updates = {"": live, SERVICE_NAME: ready}
        names = {name for name, *_ in self.manager.index(repository_models=False)}
        for name in names | self._health_names:
            model_ready = bool(self.manager.ready_versions(name)) and serving
            updates[name] = status.SERVING if model_ready else status.NOT_SERVING
        self._health_names |= names
        for name, value in updates.items():
            loop.create_task(self.health.set(name, value))
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
        self._server = self._build()
        await self._server.start()
        if self.settings.http_port:
            s = self.settings
            self.http = HttpFrontend(
                self.dataplane,
                self.max_message_bytes,
                auth_token=s.auth_token,
                ssl_context=http_ssl_context(s),
                client_certificate_required=s.tls_client_ca is not None,
            )
            try:
                await self.http.start(s.host, s.http_port)
            except OSError as err:
                await self._server.stop(None)
                raise OSError(f"cannot listen on {s.host}:{s.http_port} (--http-port): {err}") from err
        self._tasks.append(loop.create_task(self._health_loop()))
        log.info(
            "event=listening grpc=%s:%d http_port=%d metrics_port=%d tls=%s auth=%s strict_readiness=%s "
            "max_inflight_bytes=%d max_message_bytes=%d",
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
            if self.settings.poll_seconds:
                self._tasks.append(loop.create_task(self.manager.poll(self.settings.poll_seconds)))
            log.info("event=ready models=%s", [f"{n}:{v}:{s}" for n, v, s, _ in self.manager.index()])
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
        log.info("event=draining drain_seconds=%.1f grace_seconds=%.1f", s.drain_seconds, s.grace_seconds)
        self.dataplane.draining = True
        self.manager.draining = True  # from now on nothing is loaded; loads in flight roll back
        self._sync_health()
        await asyncio.sleep(s.drain_seconds)  # still serving: let load balancers see NOT_SERVING
        for task in self._tasks:
            task.cancel()
        deadline = loop.time() + s.grace_seconds
        await self.manager.drain_all(s.grace_seconds)
        assert self._server is not None
        if self.http is not None:
            await self.http.stop()
        await self._server.stop(grace=max(0.1, min(1.0, deadline - loop.time())))
        log.info("event=stopped")
