"""Python backend: a ``model.py`` that defines ``class Model`` with ``execute``.

For pre/post-processing models, test doubles and anything not expressible in
ONNX or TorchScript. ``execute(inputs: dict[str, ndarray]) -> dict[str, ndarray]``
runs in the replica's worker thread; an optional ``close()`` is called on
unload. The model's config must list its inputs and outputs.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np

from tensorwire.server.backends.base import Placement, TensorInfo

_counter = itertools.count()


class PythonBackend:
    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None

    def __init__(self, path: Path, placement: Placement) -> None:
        spec = importlib.util.spec_from_file_location(f"tensorwire_python_model_{next(_counter)}", path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "Model"):
            raise RuntimeError(f"{path} defines no class Model")
        self._model = module.Model()
        self.device = placement.device

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        result = self._model.execute(inputs)
        return {name: np.asarray(result[name]) for name in output_names}

    def close(self) -> None:
        close = getattr(self._model, "close", None)
        if close is not None:
            close()
