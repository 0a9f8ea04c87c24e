"""What every backend provides: tensor signatures and a synchronous ``run``.

A backend instance belongs to exactly one replica and is only ever called from
that replica's worker thread, so it needs no locking of its own.
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


class Backend(Protocol):
    """A loaded model session."""

    #: Declared by the model file; None when the format cannot tell (TorchScript, Python).
    inputs: list[TensorInfo] | None
    outputs: list[TensorInfo] | None
    #: The device actually used (after any fallback), for logs and metrics labels.
    device: str

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run one (possibly batched) execution; return at least ``output_names``."""
        ...

    def close(self) -> None:
        """Release the session's resources."""
        ...
