"""What every backend provides: tensor signatures, a synchronous ``run`` and ``close``.

A backend instance belongs to exactly one replica and runs one batch at a time, so it needs no locking of
its own: in the replica's worker thread, or, for a model measured to be faster than that hand-off, on the
event loop's thread (``tensorwire.server.handoff``). Shapes here are numpy shapes: with the batch dimension first
for models served with ``max_batch_size > 0`` (the rows of every request in the batch, concatenated),
without one for ``max_batch_size = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """A model tensor as the model file declares it; ``shape`` includes any batch dimension (-1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """Where a replica runs: ``device`` is "cpu" or "cuda:N"; ``threads`` intra-op threads;
    ``spin_wait`` lets those threads spin between runs (ONNX Runtime)."""

    device: str = "cpu"
    threads: int = 1
    spin_wait: bool = False


class RequestDataError(Exception):
    """The runtime rejected the data of this run (an index past a table, lengths that do not broadcast).

    Raised by ``Backend.run`` only where the runtime tells such faults apart from its own (ONNX Runtime's
    INVALID_ARGUMENT and FAIL statuses, once warm-up has shown that the model runs at all); the message is
    the runtime's own and goes to the client as INVALID_ARGUMENT.
    """


class BackendCrashed(Exception):
    """The process that runs the model's code ended while running (``sys.exit()``, a crash, killed).

    The backend has already started a fresh process when it raises this, so the next run works again."""


class Backend(Protocol):
    """A loaded model session.

    Construction (``create_backend``) loads the model file and raises on a file the runtime cannot load.
    A backend may also define ``abort()``, callable from any thread, to end a run in progress (the Python
    backend kills its model's process); without it, a stuck run is abandoned with its thread.
    """

    #: Declared by the model file; None when the format cannot tell (TorchScript, Python).
    inputs: list[TensorInfo] | None
    outputs: list[TensorInfo] | None
    #: The device actually used (after any fallback), for logs and metrics labels.
    device: str

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one execution and return at least ``output_names``.

        ``inputs`` maps every input name to an array of the served datatype (BF16 arrives as float32,
        BYTES as an object array of ``bytes``); with a batch dimension first when the model is served with
        ``max_batch_size > 0`` (its size is the batch's total rows), without one otherwise. The outputs
        must have the same leading size for batched models; the caller checks them against the served
        signature. Raises ``RequestDataError`` when the runtime says the data was at fault,
        ``BackendCrashed`` when the model's process ended; anything else is a model fault (INTERNAL).
        """
        ...

    def close(self) -> None:
        """Release the session's resources (called once, from the replica's thread, after its last run)."""
        ...
