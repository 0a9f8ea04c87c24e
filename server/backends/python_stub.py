"""The process that runs one replica of a Python-backend model (started by ``PythonBackend``).

``python -m tensorwire.server.backends.python_stub FD MODEL_PY``: builds ``Model()`` from MODEL_PY, says
``("ready",)`` (or ``("error", text)``) on the socket FD, then answers each ``("run", inputs,
output_names)`` with ``("ok", outputs)`` or ``("error", text)``, until ``("close",)`` or the end of the
socket. Nothing here catches ``SystemExit`` from the model's code: the process ends, and the server starts
a new one. The process ends by itself when the server's process is gone.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

import numpy as np


def _watch_parent(parent: int) -> None:
    """End this process soon after the server's process ends (however it ended)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _load(path: str) -> object:
    spec = importlib.util.spec_from_file_location("tensorwire_python_model", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {os.path.basename(path)}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Model"):
        raise RuntimeError(f"{os.path.basename(path)} defines no class Model")
    return module.Model()


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=5))


def main(argv: list[str]) -> int:
    fd, path = int(argv[1]), argv[2]
    # The server drains on SIGINT/SIGTERM and closes this process itself; a signal to the whole process
    # group must not end the model before the work it accepted is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    try:
        model = _load(path)
    except Exception as err:  # noqa: BLE001 - reported to the server as the load failure
        traceback.print_exc()
        _send(conn, ("error", f"{type(err).__name__}: {err}"))
        return 1
    _send(conn, ("ready",))
    while True:
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            break
        if message[0] == "close":
            close = getattr(model, "close", None)
            if close is not None:
                close()
            break
        _, inputs, names = message
        try:
            result = model.execute(inputs)
            payload = pickle.dumps(("ok", {name: np.asarray(result[name]) for name in names}), protocol=5)
        except Exception as err:  # noqa: BLE001 - the model's fault: reported, the process goes on
            traceback.print_exc()
            payload = pickle.dumps(("error", f"{type(err).__name__}: {err}"), protocol=5)
        conn.send_bytes(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
