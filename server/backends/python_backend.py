"""Python backend: a ``model.py`` that defines ``class Model`` with ``execute``, run in its own process.

For pre/post-processing models, test doubles and anything not expressible in ONNX or TorchScript.
``execute(inputs: dict[str, ndarray]) -> dict[str, ndarray]`` receives the batch (batch dimension first
when the model is served with ``max_batch_size > 0``); an optional ``close()`` is called on unload. The
model's config must list its inputs and outputs.

Each replica's model runs in a child process (``python_stub``), as Triton runs Python models in stub
processes: it is the riskiest code a user brings, and in a process of its own a ``sys.exit()``, a crash or
a hang costs that process (restarted here, or killed by the replica's execution timeout), never the
server, its event loop or the other models. Tensors cross a socket pair as pickle protocol 5 frames.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from tensorwire.server.backends.base import BackendCrashed, Placement, TensorInfo

log = logging.getLogger("tensorwire.backend.python")

#: How long ``close`` waits for the model's ``close()`` and the process to end before killing it (s).
CLOSE_TIMEOUT_S = 5.0


class PythonModelError(RuntimeError):
    """``Model.execute`` raised in the model's process; the message is ``"<type>: <text>"`` (log only)."""


class PythonBackend:
    """A Python model served from a child process; one process per replica."""

    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None

    def __init__(self, path: Path, placement: Placement) -> None:
        self._path = Path(path)
        self._threads = placement.threads
        self.device = placement.device
        self._lock = threading.Lock()  # guards _process against abort() from another thread
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._aborted = False  # set by abort(): the replica is being given up, start nothing more
        self._start()

    # ------------------------------------------------------------ process

    def _start(self) -> None:
        """Start the model's process and wait until ``Model()`` has been built (raises if it fails)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self._threads))
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tensorwire.server.backends.python_stub",
                    str(theirs.fileno()),
                    str(self._path),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        with self._lock:
            self._process, self._conn = process, conn
        try:
            reply = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            code = self._reap()
            raise RuntimeError(f"the model's process exited with code {code} while building Model()") from None
        if reply[0] != "ready":
            self._reap()
            raise RuntimeError(reply[1])

    def _reap(self) -> int | None:
        """Forget the current process (killing it if still running); its exit code."""
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is None:
            return None
        if process.poll() is None:
            process.kill()
        return process.wait()

    # ---------------------------------------------------------------- run

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Send the batch to the model's process and wait for its outputs.

        Raises ``PythonModelError`` when ``execute`` raised (the process goes on), ``BackendCrashed`` when
        the process ended meanwhile (a new one is started first; if that fails too, the next run tries
        again)."""
        conn = self._conn
        if conn is None:
            self._start()
            conn = self._conn
            assert conn is not None
        try:
            conn.send_bytes(pickle.dumps(("run", inputs, list(output_names)), protocol=5))
            reply = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            code = self._reap()
            if self._aborted:
                raise BackendCrashed(f"the model's process was stopped (exit code {code})") from None
            note = "a new process was started"
            try:
                self._start()
            except Exception as err:  # noqa: BLE001 - reported in the message; the next run retries
                note = f"a new process could not be started ({err})"
            raise BackendCrashed(f"the model's process exited with code {code} while running; {note}") from None
        if reply[0] == "ok":
            return reply[1]
        raise PythonModelError(reply[1])

    def abort(self) -> None:
        """Kill the model's process (from any thread): a run in progress raises ``BackendCrashed`` at once."""
        with self._lock:
            self._aborted = True
            process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    def close(self) -> None:
        """Call the model's ``close()`` in its process and let the process end (killed after 5 s)."""
        with self._lock:
            process, conn = self._process, self._conn
        if process is None or conn is None:
            return
        try:
            conn.send_bytes(pickle.dumps(("close",), protocol=5))
            process.wait(CLOSE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            log.warning("event=python_model_close_timeout model=%s action=kill", self._path)
        self._reap()
