"""Channel construction shared by the blocking and asyncio clients.

Everything that decides *how* bytes reach a server lives here: the target
string (one address, or several with client-side round-robin), channel
options (message limits, keep-alive, reconnect back-off), TLS / mutual-TLS
credentials read from files, the bearer token and compression.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tensorwire.client.retry import RetryPolicy
from tensorwire.proto.service import METHODS

#: 2 GiB - 1 on both sides by default, as the server's (gRPC's 4 MiB default trips real models).
DEFAULT_MAX_MESSAGE_BYTES = 2**31 - 1
#: The conventional gRPC port of v2 inference servers (tensorwire, Triton).
DEFAULT_PORT = 8001

PathLike = str | Path


@dataclass(frozen=True)
class TLSConfig:
    """TLS from PEM files; with ``cert_file`` and ``key_file`` it is mutual TLS.

    ``ca_file`` is the CA bundle that signed the server's certificate (``None``:
    the system's roots). ``server_name`` overrides the host name checked against the
    certificate, for servers reached by IP address or through a tunnel.
    """

    ca_file: PathLike | None = None
    cert_file: PathLike | None = None
    key_file: PathLike | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both cert_file and key_file")

    def credentials(self) -> grpc.ChannelCredentials:
        """Read the files now, so that a wrong path fails here rather than at the first call."""

        def read(path: PathLike | None) -> bytes | None:
            return None if path is None else Path(path).expanduser().read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


@dataclass(frozen=True)
class KeepAlive:
    """HTTP/2 keep-alive pings: notice dead connections (and keep NAT/LB idle timers open).

    Pings go out after ``time_s`` without activity and the connection is dropped when no
    answer comes within ``timeout_s``. ``permit_without_calls`` pings idle connections
    too; servers reject pings more frequent than they allow (gRPC's default: one per
    5 minutes when idle), so it is off by default.
    """

    time_s: float = 60.0
    timeout_s: float = 20.0
    permit_without_calls: bool = False

    def options(self) -> list[tuple[str, Any]]:
        """The gRPC channel options for these settings (milliseconds, as gRPC takes them)."""
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(self.permit_without_calls)),
        ]


def split_addresses(address: str | Sequence[str]) -> list[str]:
    """One or more addresses from a string (comma-separated allowed) or a sequence."""
    items = address.split(",") if isinstance(address, str) else list(address)
    result = [item.strip() for item in items if item and item.strip()]
    if not result:
        raise ValueError("no server address given")
    return result


def _host_port(address: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` / ``host`` (default port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    elif ":" in address:  # a bare IPv6 literal
        host, port = address, ""
    else:
        host, port = address, ""
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad server address {address!r}: the port must be a number") from None


def _resolve(host: str, port: int) -> list[tuple[int, str]]:
    """(family, ip) pairs for a host, IP literals as they are."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [(4 if ip.version == 4 else 6, str(ip))]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ValueError(f"cannot resolve server host {host!r}: {error}") from None
    seen: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        entry = (4 if family == socket.AF_INET else 6, str(sockaddr[0]))
        if entry not in seen:
            seen.append(entry)
    return seen


def build_target(addresses: Sequence[str]) -> tuple[str, str | None]:
    """A gRPC target for the addresses, plus the host name to check in TLS (if any).

    One address goes to gRPC as it is (``host:port`` uses its DNS resolver and
    re-resolution; ``unix:``, ``dns:///`` and friends pass through). Several
    addresses become one static ``ipv4:a:p,b:p`` (or ``ipv6:``) target, the form
    gRPC's round_robin policy balances over; host names among them are resolved
    once, here, and the first one is kept for TLS name checks.
    """
    if len(addresses) == 1:
        address = addresses[0]
        if "://" in address or address.split(":", 1)[0] in ("unix", "unix-abstract", "ipv4", "ipv6", "dns"):
            return address, None
        if ":" not in address:
            address = f"{address}:{DEFAULT_PORT}"
        return address, None
    endpoints: dict[int, list[str]] = {4: [], 6: []}
    tls_name: str | None = None
    for address in addresses:
        host, port = _host_port(address)
        for family, ip in _resolve(host, port):
            if tls_name is None and ip != host:
                tls_name = host
            endpoints[family].append(f"{ip}:{port}" if family == 4 else f"[{ip}]:{port}")
    family = 4 if endpoints[4] else 6
    unique = list(dict.fromkeys(endpoints[family]))
    return f"ipv{family}:" + ",".join(unique), tls_name


def service_config(load_balancing: str | None) -> str | None:
    """The service config JSON selecting gRPC's own load-balancing policy."""
    if not load_balancing:
        return None
    return json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})


_COMPRESSION = {
    None: None,
    "none": None,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}


def compression_of(name: str | None) -> grpc.Compression | None:
    """``"gzip"``/``"deflate"``/``None`` as a ``grpc.Compression`` (applies to every request)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _COMPRESSION:
        raise ValueError(f"compression must be one of gzip, deflate or None, not {name!r}")
    return _COMPRESSION[key]


@dataclass(frozen=True)
class ChannelSpec:
    """Everything needed to open a channel, sync or asyncio, computed once per client."""

    target: str
    options: tuple[tuple[str, Any], ...]
    credentials: grpc.ChannelCredentials | None
    compression: grpc.Compression | None
    metadata: tuple[tuple[str, str], ...] | None

    def open_sync(self) -> grpc.Channel:
        """A blocking ``grpc.Channel`` to the target (it connects lazily, at the first call)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.target, options=self.options, compression=self.compression)
        return grpc.secure_channel(self.target, self.credentials, options=self.options, compression=self.compression)

    def open_aio(self) -> grpc.aio.Channel:
        """A ``grpc.aio.Channel`` to the target, bound to the running event loop."""
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=self.options, compression=self.compression)
        return grpc.aio.secure_channel(
            self.target, self.credentials, options=self.options, compression=self.compression
        )


def channel_spec(
    address: str | Sequence[str],
    *,
    tls: TLSConfig | bool | None,
    token: str | None,
    compression: str | None,
    keepalive: KeepAlive | None,
    max_message_bytes: int,
    load_balancing: str | None,
    retry: RetryPolicy,
    options: Sequence[tuple[str, Any]],
    user_agent: str,
) -> ChannelSpec:
    """Turn the client's keyword arguments into a :class:`ChannelSpec` (arguments as in ``ClientBase``).

    Raises ValueError for an empty address list, a port that is not a number, a host that
    cannot be resolved (several addresses only) or unknown compression; OSError when a TLS
    file cannot be read.
    """
    addresses = split_addresses(address)
    target, tls_name = build_target(addresses)
    if load_balancing is None and len(addresses) > 1:
        load_balancing = "round_robin"
    opts: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Reconnect quickly after a failed connect; our retries cannot succeed before
        # gRPC tries the connection again (its default first back-off is 1 s, up to 120 s).
        ("grpc.initial_reconnect_backoff_ms", max(100, int(retry.initial_backoff * 1000))),
        ("grpc.max_reconnect_backoff_ms", max(1000, int(retry.max_backoff * 1000))),
        ("grpc.primary_user_agent", user_agent),
    ]
    if keepalive is not None:
        opts += keepalive.options()
    config = service_config(load_balancing)
    if config is not None:
        opts.append(("grpc.service_config", config))
    credentials: grpc.ChannelCredentials | None = None
    if tls:
        spec = tls if isinstance(tls, TLSConfig) else TLSConfig()
        credentials = spec.credentials()
        name = spec.server_name or tls_name
        if name:
            opts.append(("grpc.ssl_target_name_override", name))
    opts += list(options)
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    return ChannelSpec(target, tuple(opts), credentials, compression_of(compression), metadata)


def unary_stubs(channel: Any) -> dict[str, Any]:
    """Callables for every unary method of the v2 service, by short name (``"ModelInfer"``, ...).

    ``channel`` is a ``grpc.Channel`` or a ``grpc.aio.Channel``: both build their callables the
    same way, for the standard wire path ``/inference.GRPCInferenceService/<Method>``.
    """
    return {
        name: channel.unary_unary(
            method.path,
            request_serializer=method.request.SerializeToString,
            response_deserializer=method.response.FromString,
        )
        for name, method in METHODS.items()
        if not method.client_streaming and not method.server_streaming
    }


def stream_stub(channel: Any) -> Any:
    """The ``ModelStreamInfer`` callable (bidirectional) for a sync or asyncio channel."""
    stream = METHODS["ModelStreamInfer"]
    return channel.stream_stream(
        stream.path,
        request_serializer=stream.request.SerializeToString,
        response_deserializer=stream.response.FromString,
    )
