"""Start the real tensorwire server as a subprocess on a loopback port, for tests.

Every test that talks to a server goes through real gRPC to a real process:
``with running_server(repo) as server: ... server.address``. The launcher is the benchmark harness's
(:mod:`tensorwire.loadtest.launch`), so tests and benchmarks start servers the same way; this module keeps
the names the tests use.

``TENSORWIRE_TEST_WORKERS=N`` runs every server these tests start with ``--workers N`` (front-end
processes in front of one engine process) unless a test asks for its own ``--workers``: the same tests then
check the multi-process server. ``tests/test_workers.py`` runs a chosen subset that way in the default suite.
"""

from __future__ import annotations

import contextlib
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tensorwire.loadtest.launch import ServerProcess, call, free_port, serve

__all__ = [
    "WORKERS_ENV",
    "RunningServer",
    "call",
    "free_port",
    "pending_requests",
    "running_server",
    "scrape",
    "server_args",
    "wait_pending",
]

#: The environment variable that runs every test server with ``--workers N``.
WORKERS_ENV = "TENSORWIRE_TEST_WORKERS"

#: a started server: ``address``, ``port``, ``metrics_port``, ``process``, ``log()``, ``channel()``, ``stop()``
RunningServer = ServerProcess


@contextlib.contextmanager
def running_server(
    repo: Path,
    *args: str,
    ready_timeout: float = 120,
    env: dict | None = None,
    wait: bool = True,
    http: bool = False,
) -> Iterator[RunningServer]:
    """Run ``tensorwire serve --repo REPO ARGS...`` on free loopback ports (gRPC and metrics; with ``http``
    the HTTP/REST front-end too, at ``server.http_address``) until the block ends; the log is
    ``<repo>/../server-<port>.log``. With ``wait``, the block starts once ServerReady is true.
    """
    with serve(
        repo, *server_args(args), ready_timeout=ready_timeout, env=env, wait=wait, http=http, log_dir=Path(repo).parent
    ) as server:
        yield server


def server_args(args: tuple[str, ...] | list[str]) -> list[str]:
    """``args`` plus ``--workers N`` when ``TENSORWIRE_TEST_WORKERS`` is set and ``args`` has no ``--workers``."""
    workers = os.environ.get(WORKERS_ENV, "").strip()
    if workers and "--workers" not in args:
        return [*args, "--workers", workers]
    return list(args)


def scrape(server: RunningServer) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's Prometheus endpoint, keyed by (sample name, sorted label items)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def pending_requests(server: RunningServer, model: str) -> float:
    """Requests for ``model`` queued and not yet running (the ``tensorwire_pending_requests`` gauge)."""
    return sum(
        value
        for (name, labels), value in scrape(server).items()
        if name == "tensorwire_pending_requests" and ("model", model) in labels
    )


def wait_pending(server: RunningServer, model: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until at least ``count`` requests for ``model`` are queued; AssertionError after ``timeout_s``
    seconds. The synchronisation for tests that need requests waiting in a queue (never a fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while (pending := pending_requests(server, model)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{pending:.0f} of {count} requests queued for {model} after {timeout_s} s")
        time.sleep(0.05)
