"""``tensorwire serve``: command-line options -> ServerSettings -> a running server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from tensorwire.server.app import MAX_MESSAGE_BYTES, InferenceServer, ServerSettings

#: The most front-end processes ``--workers`` accepts.
MAX_WORKERS = 64

TOKEN_ENV = "TENSORWIRE_AUTH_TOKEN"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where there is one to show: not for required options, options whose
    default is None (the help says what happens without them), or help that already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.required or action.default is None or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorwire serve",
        description="Serve every model in a repository over gRPC and HTTP/REST (Open Inference Protocol / KServe v2).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--repo",
        type=Path,
        required=True,
        help="model repository folder: <repo>/<model>/config.toml and <repo>/<model>/<version>/",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (127.0.0.1 for local only)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (inference, health, reflection)")
    parser.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="HTTP/REST port (KServe v2 REST and Triton's binary-tensor extension, health at /v2/health/*); 0 disables",
    )
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics HTTP port; 0 disables")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=MAX_MESSAGE_BYTES,
        help="largest request or response accepted; larger ones get RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=None,
        help="server-wide budget for request and response bytes of inference calls in flight; calls beyond it "
        "get RESOURCE_EXHAUSTED, and no message may be larger (default: a quarter of the memory limit)",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM server certificate (enables TLS; needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        help="PEM CA bundle; clients must present a certificate it signed (mutual TLS)",
    )
    parser.add_argument(
        "--auth-token-file",
        type=Path,
        help=f"require 'authorization: Bearer <token>' with the token in this file "
        f"(or set {TOKEN_ENV}); health checks stay open",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=2.0,
        help="on SIGTERM: keep serving this long after readiness turns NOT_SERVING",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM: the most time given to finish accepted requests",
    )
    parser.add_argument(
        "--poll",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="reload models whose files changed every SECONDS (0: only on RepositoryModelLoad)",
    )
    parser.add_argument(
        "--strict-readiness",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ServerReady (and health '') only when every model in the repository is READY, as Triton's "
        "default; --no-strict-readiness: ready once the server is up, whatever the models' states",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="front-end processes sharing the gRPC and HTTP ports in front of one engine process that batches "
        "for all of them (helps with many client connections; 1: one process, as before). Default: from the "
        "cores (1 on 2 cores or fewer, see README, 'Front-end processes')",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (one structured line per event)",
    )
    return parser


def settings_from(args: argparse.Namespace) -> ServerSettings:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("tensorwire serve: error: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("tensorwire serve: error: --tls-client-ca needs --tls-cert/--tls-key")
    token = os.environ.get(TOKEN_ENV) or None
    if args.auth_token_file:
        token = args.auth_token_file.read_text().strip()
        if not token:
            raise SystemExit(f"tensorwire serve: error: {args.auth_token_file} is empty")
    if args.max_inflight_bytes is not None and args.max_inflight_bytes <= 0:
        raise SystemExit("tensorwire serve: error: --max-inflight-bytes must be positive")
    for flag, port in (("--grpc-port", args.grpc_port), ("--http-port", args.http_port)):
        if not 0 <= port <= 65535:
            raise SystemExit(f"tensorwire serve: error: {flag} must be a TCP port (0-65535), got {port}")
    if args.http_port and args.http_port in (args.grpc_port, args.metrics_port):
        raise SystemExit("tensorwire serve: error: --http-port must differ from --grpc-port and --metrics-port")
    if args.workers is None:
        from tensorwire.server.workers import default_workers

        workers = default_workers()
    else:
        workers = args.workers
    if not 1 <= workers <= MAX_WORKERS:
        raise SystemExit(f"tensorwire serve: error: --workers must be between 1 and {MAX_WORKERS}, got {workers}")
    if not args.repo.is_dir():
        raise SystemExit(f"tensorwire serve: error: repository {args.repo} is not a folder")
    return ServerSettings(
        repo=args.repo,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        max_inflight_bytes=args.max_inflight_bytes,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=token,
        drain_s=args.drain_seconds,
        grace_s=args.grace_seconds,
        poll_s=args.poll,
        strict_readiness=args.strict_readiness,
        workers=workers,
    )


def _port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (e.g. "address already in use"), or None if it can.

    Binds the way gRPC and the metrics server do (SO_REUSEADDR, so a port left in TIME_WAIT by
    a server that just stopped still counts as free) and releases the port at once.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        return f"cannot resolve {host!r}: {error.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            return (error.strerror or str(error)).lower()
    return None


def _listen_error(host: str, port: int, what: str, option: str, why: str) -> str:
    return (
        f"tensorwire serve: error: cannot listen on {host}:{port} for {what}: {why}; "
        f"choose another port with {option} (make serve: {option.strip('-').replace('-', '_').upper()}=N)"
    )


def check_ports(settings: ServerSettings) -> None:
    """One line naming the port and the option to change it, instead of a traceback, when a port is taken.

    Raises:
        SystemExit: with that line, when the gRPC, HTTP or metrics port cannot be bound.
    """
    ports = [
        (settings.grpc_port, "gRPC", "--grpc-port"),
        (settings.http_port, "HTTP", "--http-port"),
        (settings.metrics_port, "metrics", "--metrics-port"),
    ]
    for port, what, option in ports:
        why = _port_taken(settings.host, port) if port else None
        if why:
            raise SystemExit(_listen_error(settings.host, port, what, option, why))


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    settings = settings_from(args)
    check_ports(settings)
    if settings.workers > 1:
        from tensorwire.server.workers import MultiProcessServer

        server = MultiProcessServer(settings, log_level=args.log_level)
    else:
        server = InferenceServer(settings)
    try:
        code = asyncio.run(server.run())
    except OSError as err:  # a port taken or not ours to bind: one line, not a traceback
        logging.getLogger("tensorwire.server").error("event=start_failed error=%r", str(err))
        print(f"tensorwire serve: error: {err}", file=sys.stderr)
        code = 1
    # A model stuck in native code leaves its (daemon) thread behind; end the process now rather than let
    # interpreter shutdown wait on or trip over it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
