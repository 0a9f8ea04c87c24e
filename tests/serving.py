"""Start the real tensorwire server as a subprocess on a loopback port, for tests.

Every test that talks to a server goes through real gRPC to a real process:
``with running_server(repo) as server: ... server.address``. The launcher is the benchmark harness's
(:mod:`tensorwire.loadtest.launch`), so tests and benchmarks start servers the same way; this module keeps
the names the tests use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from tensorwire.loadtest.launch import ServerProcess, call, free_port, serve

__all__ = ["RunningServer", "call", "free_port", "running_server"]

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
        repo, *args, ready_timeout=ready_timeout, env=env, wait=wait, http=http, log_dir=Path(repo).parent
    ) as server:
        yield server
