"""One way to start a server under test: a subprocess on free loopback ports, used by tests and benchmarks alike.

    with serve(repo, "--drain-seconds", "0") as server:          # tensorwire serve
        ... server.address, server.pid, server.cpu_s() ...
    with serve(repo, kind="bare") as baseline:                    # loadtest/bare_server.py
        ...

:func:`serve` picks free loopback ports, starts the server with its output in a log file, waits until
``ServerReady`` (and ``ModelReady`` for each name in ``models``) answers true, yields a
:class:`ServerProcess`, and stops the server (SIGTERM, then SIGKILL after ``stop_timeout_s``) when the
block ends. Every server kind speaks the same protocol, so readiness is checked the same way for all of them.
Extra command-line options (``--workers 2``, ``--auth-token-file ...``) are passed through unchanged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tensorwire.loadtest import _stats
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

#: server kinds :func:`serve` can start: kind -> the module run with ``python -m``
KINDS = {"tensorwire": "tensorwire.cli", "bare": "tensorwire.loadtest.bare_server"}
#: how often readiness is polled while a server starts, seconds
POLL_S = 0.1
#: a server that exits at start-up saying this lost the race for its port; it is started again on new ports
PORT_TAKEN = ("address already in use", "errno 98", "failed to bind", "port is in use", "already in use")
PORT_ATTEMPTS = 3
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (the OS picks it; another process may take it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(channel: grpc.Channel, method: str, request: Any, timeout: float = 10, metadata: Any = None) -> Any:
    """Call one unary method of the standard v2 service (``ServerReady``, ``ModelInfer``, ...) on a plain channel.

    Raises ``grpc.RpcError`` when the call fails; ``KeyError`` for a name the service does not have.
    """
    m = METHODS[method]
    stub = channel.unary_unary(
        m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
    )
    return stub(request, timeout=timeout, metadata=metadata)


@dataclass
class ServerProcess:
    """A server started by :func:`serve`: its process, loopback ports and log.

    ``metrics_port`` is 0 when metrics are off (and for the bare server); ``http_port`` is None unless
    an HTTP front-end was asked for. ``extra`` is free for callers (tests keep the repository path there).
    """

    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    extra: dict = field(default_factory=dict)
    http_port: int | None = None
    kind: str = "tensorwire"

    @property
    def address(self) -> str:
        """``127.0.0.1:<gRPC port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def http_address(self) -> str | None:
        """``127.0.0.1:<HTTP port>``, or None without an HTTP front-end."""
        return None if self.http_port is None else f"127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the server wrote so far (stdout and stderr), or "" before it wrote anything."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.Channel:
        """A new plaintext channel to the gRPC port, without message size limits (close it after use)."""
        return grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)

    def cpu_s(self) -> float | None:
        """CPU seconds (user + system) the server and its child processes used so far; None once it is gone."""
        return _stats.process_tree_cpu_s(self.pid)

    def wait_ready(self, timeout_s: float, models: Sequence[str] = ()) -> float:
        """Poll ``ServerReady`` (then ``ModelReady`` for each of ``models``) until true; returns the seconds taken.

        Raises RuntimeError with the end of the server's log when the process exits first or
        ``timeout_s`` passes (the process is killed then).
        """
        started = time.monotonic()
        deadline = started + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerExited(f"{self.kind} server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if call(channel, "ServerReady", pb.ServerReadyRequest(), timeout=1).ready and all(
                        call(channel, "ModelReady", pb.ModelReadyRequest(name=m), timeout=1).ready for m in models
                    ):
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(POLL_S)
        self.process.kill()
        self.process.wait()
        raise RuntimeError(f"{self.kind} server not ready after {timeout_s:.0f} s:\n{self.log()[-4000:]}")

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 40) -> int:
        """Send ``sig`` (None: none) and wait up to ``timeout`` seconds, then SIGKILL; returns the exit status."""
        if self.process.poll() is None and sig is not None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class ServerExited(RuntimeError):
    """The server process ended before it was ready."""


def command(
    kind: str, repo: Path, port: int, metrics_port: int, http_port: int | None, args: Sequence[str]
) -> list[str]:
    """The command line that starts a server of ``kind`` for ``repo`` on loopback (see :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown server kind {kind!r}; choose from {', '.join(KINDS)}")
    head = [sys.executable, "-m", KINDS[kind]]
    if kind == "bare":
        return [*head, "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port), *args]
    ports = ["--grpc-port", str(port), "--metrics-port", str(metrics_port)]
    ports += ["--http-port", str(http_port or 0)]  # off unless asked for: its default port (8000) is shared
    return [*head, "serve", "--repo", str(repo), "--host", "127.0.0.1", *ports, *args]


def _start(
    kind: str, repo: Path, args: Sequence[str], metrics: bool, http: bool, log_dir: Path | None, env: dict | None
) -> ServerProcess:
    port = free_port()
    metrics_port = free_port() if metrics and kind == "tensorwire" else 0
    http_port = free_port() if http and kind == "tensorwire" else None
    if log_dir is None:
        handle, name = tempfile.mkstemp(prefix=f"tensorwire-{kind}-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    else:
        log_path = Path(log_dir) / f"{'server' if kind == 'tensorwire' else kind}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command(kind, Path(repo), port, metrics_port, http_port, args),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    return ServerProcess(process, port, metrics_port, log_path, http_port=http_port, kind=kind)


@contextlib.contextmanager
def serve(
    repo: Path,
    *args: str,
    kind: str = "tensorwire",
    ready_timeout: float = 120,
    models: Sequence[str] = (),
    env: dict | None = None,
    wait: bool = True,
    metrics: bool = True,
    http: bool = False,
    log_dir: Path | None = None,
    stop_timeout_s: float = 40,
) -> Iterator[ServerProcess]:
    """Run a server of ``kind`` for ``repo`` on free loopback ports until the block ends.

    ``args`` are extra command-line options. ``metrics=False`` turns tensorwire's metrics port off;
    ``http=True`` also gives it ``--http-port`` (the bare server has neither). The log goes to
    ``log_dir/server-<port>.log`` (``bare-<port>.log``), kept, or without ``log_dir`` to a temporary file
    removed afterwards. With ``wait`` the block starts once the
    server (and every model in ``models``) is ready; a server that lost the race for its port is started
    again on new ports (up to 3 times). Raises RuntimeError when it exits or is not ready within
    ``ready_timeout`` seconds.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        server = _start(kind, repo, args, metrics, http, log_dir, env)
        if not wait:
            break
        try:
            server.wait_ready(ready_timeout, models)
            break
        except ServerExited as err:  # its log is in the message
            _discard(server, log_dir)
            if attempt == PORT_ATTEMPTS or not any(text in str(err).lower() for text in PORT_TAKEN):
                raise
        except BaseException:
            server.stop(signal.SIGKILL, timeout=10)
            _discard(server, log_dir)
            raise
    try:
        yield server
    finally:
        server.stop(timeout=stop_timeout_s)
        _discard(server, log_dir)


def _discard(server: ServerProcess, log_dir: Path | None) -> None:
    """Remove the log of a server that had no log folder (a temporary file)."""
    if log_dir is None:
        server.log_path.unlink(missing_ok=True)
