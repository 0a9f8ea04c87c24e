"""The listening side of one process: the gRPC server and the HTTP/REST front-end over a data plane, and the
gRPC health statuses they publish.

The single-process server (``tensorwire serve``, ``--workers 1``) runs one :class:`Listeners` beside its
engine; with ``--workers N`` each of the N front-end processes runs one over a remote engine, every one
listening on the same ports (``SO_REUSEPORT``: the kernel spreads incoming connections across them).

Health: liveness and readiness mean different things. Live = the process serves requests, also while
models load and while it drains (gRPC health service ``""``, ``ServerLive``, HTTP ``/v2/health/live``):
a liveness probe must never restart a pod that is busy loading or shutting down cleanly. Ready = the
start-up load is done, the server is not draining and the models are ready (strict readiness by default)
(gRPC health service ``inference.GRPCInferenceService``, ``ServerReady``, HTTP ``/v2/health/ready``);
each model's name is a health service too (that model has a READY version and the server is not draining).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tensorwire.proto.service import SERVICE_NAME, standard_descriptor_pool
from tensorwire.server.auth import TokenAuthInterceptor
from tensorwire.server.dataplane import DataPlane
from tensorwire.server.http_frontend import HttpFrontend
from tensorwire.server.servicer import Servicer
from tensorwire.server.standard_services import health_handler, reflection_handler

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
    drain_s: float = 2.0
    grace_s: float = 30.0
    poll_s: float = 0.0  # 0: explicit model control only
    strict_readiness: bool = True  # ServerReady needs every model READY (Triton's default)
    workers: int = 1  # front-end processes; 1: one process holds front-ends and engine


_PATH_FIELDS = ("repo", "tls_cert", "tls_key", "tls_client_ca")


def settings_to_dict(settings: ServerSettings) -> dict[str, Any]:
    """``settings`` as JSON-able values (paths as strings), for a front-end process."""
    values = dataclasses.asdict(settings)
    for name in _PATH_FIELDS:
        if values[name] is not None:
            values[name] = str(values[name])
    return values


def settings_from_dict(values: dict[str, Any]) -> ServerSettings:
    """The ``ServerSettings`` that ``settings_to_dict`` wrote."""
    values = dict(values)
    for name in _PATH_FIELDS:
        if values.get(name) is not None:
            values[name] = Path(values[name])
    return ServerSettings(**values)


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


class Listeners:
    """The gRPC port (inference, ``grpc.health.v1``, reflection, token auth, TLS) and the HTTP port over
    ``dataplane``, in this process.

    ``max_message_bytes``: the largest message either way (already capped at the memory budget).
    ``reuse_port``: bind with ``SO_REUSEPORT`` so that several front-end processes share each port.
    """

    def __init__(
        self, settings: ServerSettings, dataplane: DataPlane, max_message_bytes: int, reuse_port: bool = False
    ) -> None:
        self.settings = settings
        self.dataplane = dataplane
        self.max_message_bytes = max_message_bytes
        self.reuse_port = reuse_port
        self.health = health.aio.HealthServicer()
        self.servicer = Servicer(dataplane)
        self.grpc: grpc.aio.Server | None = None
        self.http: HttpFrontend | None = None
        self._health_names: set[str] = set()

    # ------------------------------------------------------------ lifecycle

    def _build(self) -> grpc.aio.Server:
        s = self.settings
        interceptors = []
        if s.auth_token:
            refuse = self.dataplane.refuse
            interceptors.append(TokenAuthInterceptor(s.auth_token, lambda method: refuse(method, "unauthenticated")))
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
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
        refuse_malformed = self.servicer.refuse_malformed
        services = [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),
                health_handler(self.health, refuse_malformed),
                reflection_handler(services, reflection_pool(), refuse_malformed),
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

    async def start(self) -> None:
        """Listen on the gRPC port, then on the HTTP port (when not 0). Raises OSError, naming the port and
        its option, when either cannot be bound (gRPC is stopped again then)."""
        s = self.settings
        self.grpc = self._build()
        await self.grpc.start()
        if s.http_port:
            self.http = HttpFrontend(
                self.dataplane,
                self.max_message_bytes,
                auth_token=s.auth_token,
                ssl_context=http_ssl_context(s),
                client_certificate_required=s.tls_client_ca is not None,
                reuse_port=self.reuse_port,
            )
            try:
                await self.http.start(s.host, s.http_port)
            except OSError as err:
                await self.grpc.stop(None)
                raise OSError(f"cannot listen on {s.host}:{s.http_port} (--http-port): {err}") from err

    async def stop(self, grace_s: float) -> None:
        """Close the HTTP port (after the accepted requests were answered), then stop gRPC within ``grace_s``
        seconds (at least 0.1 s, so that answers already written reach their callers)."""
        if self.http is not None:
            await self.http.stop()
        if self.grpc is not None:
            await self.grpc.stop(grace=max(0.1, grace_s))

    # --------------------------------------------------------------- health

    def sync_health(self) -> None:
        """Health statuses: '' is liveness (SERVING while the process serves), the inference service's name
        readiness, each model's name that model's readiness (as the engine reports it)."""
        dataplane = self.dataplane
        engine = dataplane.engine
        serving = dataplane.started and not dataplane.draining
        status = health_pb2.HealthCheckResponse
        live = status.SERVING if dataplane.live() else status.NOT_SERVING
        ready = status.SERVING if dataplane.ready() else status.NOT_SERVING
        loop = asyncio.get_running_loop()
        updates = {"": live, SERVICE_NAME: ready}
        names = {name for name, *_ in engine.index(repository_models=False)}
        for name in names | self._health_names:
            model_ready = bool(engine.ready_versions(name)) and serving
            updates[name] = status.SERVING if model_ready else status.NOT_SERVING
        self._health_names |= names
        for name, value in updates.items():
            loop.create_task(self.health.set(name, value))
