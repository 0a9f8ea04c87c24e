"""Start the real tensorwire server as a subprocess on a loopback port, for tests.

Every test that talks to a server goes through real gRPC to a real process:
``with running_server(repo) as server: ... server.address``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    log_path: Path
    extra: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(
            self.address,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def call(channel: grpc.Channel, method: str, request, timeout: float = 10, metadata=None):
    """Call one unary method of the standard service on a plain channel."""
    m = METHODS[method]
    stub = channel.unary_unary(
        m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
    )
    return stub(request, timeout=timeout, metadata=metadata)


def wait_ready(address: str, process: subprocess.Popen, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                if call(channel, "ServerReady", pb.ServerReadyRequest(), timeout=1).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server not ready after {timeout}s:\n{log_path.read_text()}")


@contextlib.contextmanager
def running_server(
    repo: Path, *args: str, ready_timeout: float = 120, env: dict | None = None, wait: bool = True
) -> Iterator[RunningServer]:
    """Run ``tensorwire serve --repo REPO ARGS...`` on free loopback ports until the block ends."""
    port, metrics_port = free_port(), free_port()
    log_path = Path(repo).parent / f"server-{port}.log"
    command = [
        sys.executable,
        "-m",
        "tensorwire.cli",
        "serve",
        "--repo",
        str(repo),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
    server = RunningServer(process, port, metrics_port, log_path)
    try:
        if wait:
            wait_ready(server.address, process, ready_timeout, log_path)
        yield server
    finally:
        server.stop()
