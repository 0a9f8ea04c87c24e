"""The Prometheus endpoint: ``GET /metrics`` on its own port, in a daemon thread; every other path is 404.

prometheus-client's ``start_http_server`` answers its metrics on every path, so a health probe pointed at
this port by mistake (``/v2/health/ready``, ``/healthz``) would always see 200. Here only ``/metrics``
answers (GET, with the content negotiation Prometheus uses: OpenMetrics or text format, gzip).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_PATH = "/metrics"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the stdlib's name
        pass  # one line per scrape would drown the server's own log


def metrics_app(registry: CollectorRegistry) -> Callable:
    """A WSGI app serving ``registry`` at /metrics and 404 (plain text) elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == METRICS_PATH:
            return metrics(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [f"not found: this port serves Prometheus metrics at {METRICS_PATH} only\n".encode()]

    return app


def start_metrics_server(port: int, host: str, registry: CollectorRegistry) -> _ThreadingServer:
    """Serve ``registry`` on ``host:port`` from a daemon thread; returns the server (``shutdown()`` stops it).

    Raises OSError when the port cannot be bound.
    """
    server_class = _ThreadingServer
    if ":" in host:  # an IPv6 literal
        server_class = type("_ThreadingServer6", (_ThreadingServer,), {"address_family": socket.AF_INET6})
    server = make_server(host, port, metrics_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
