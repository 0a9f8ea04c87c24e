"""Triton's ``reshape``: serve a tensor under the shape clients use when the model file has another.

A configuration entry ``{ name = "x", dims = [3, 8, 8], reshape = [1, 3, 8, 8] }`` says that clients
send ``dims`` (after the batch dimension, when the model batches) while the model takes ``reshape``.
:class:`ReshapedBackend` wraps a loaded backend: its ``inputs``/``outputs`` report the client-side
shapes (so the signature and request validation see those), ``run`` reshapes each input to the model's
shape before the run and each output to the client's shape after it. ``numpy.reshape`` of a contiguous
array is a view: nothing is copied. It runs in the replica's thread, like ``run`` itself.

Only reshapes between fixed shapes with the same number of elements reach here (the repository schema
refuses others).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorwire.repository import ModelConfigFile
from tensorwire.server.backends.base import Backend, TensorInfo
from tensorwire.server.errors import ModelLoadError


def _reshapes(specs: list[Any] | None) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """name -> (client dims, model dims) for every spec whose reshape differs from its dims."""
    return {
        spec.name: (tuple(spec.dims), tuple(spec.reshape))
        for spec in specs or []
        if spec.reshape is not None and spec.reshape != spec.dims
    }


class ReshapedBackend:
    """A backend whose tensors are presented with the configuration's ``dims`` instead of the model's
    ``reshape`` shapes. ``batched``: arrays carry a leading batch dimension that is kept as is."""

    def __init__(self, inner: Backend, config: ModelConfigFile, batched: bool) -> None:
        self._inner = inner
        self._batched = batched
        self._inputs = _reshapes(config.inputs)
        self._outputs = _reshapes(config.outputs)
        self.inputs = self._present(inner.inputs, self._inputs, "input")
        self.outputs = self._present(inner.outputs, self._outputs, "output")

    def _present(
        self,
        infos: list[TensorInfo] | None,
        reshapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
        what: str,
    ) -> list[TensorInfo] | None:
        """The model's tensors with the client-side shapes; raises ModelLoadError when the model's own
        shape does not match the configured reshape."""
        if infos is None:
            return None
        presented = []
        for info in infos:
            if info.name not in reshapes:
                presented.append(info)
                continue
            dims, model_dims = reshapes[info.name]
            lead, rest = (info.shape[:1], info.shape[1:]) if self._batched and info.shape else ((), info.shape)
            fits = len(rest) == len(model_dims) and all(m in (-1, r) for m, r in zip(rest, model_dims, strict=True))
            if not fits:
                raise ModelLoadError(
                    f"{what} {info.name!r}: reshape {list(model_dims)} does not match the model's shape "
                    f"{list(info.shape)}{' (after the batch dimension)' if self._batched else ''}"
                )
            presented.append(TensorInfo(info.name, info.datatype, tuple(lead) + dims))
        return presented

    def _reshape(self, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return array.reshape((array.shape[0], *shape) if self._batched else shape)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Reshape inputs to the model's shapes, run, reshape outputs to the client's shapes."""
        feeds = {
            name: self._reshape(array, self._inputs[name][1]) if name in self._inputs else array
            for name, array in inputs.items()
        }
        outputs = self._inner.run(feeds, output_names)
        return {
            name: self._reshape(array, self._outputs[name][0]) if name in self._outputs else array
            for name, array in outputs.items()
        }

    def __getattr__(self, name: str) -> Any:
        # Everything else (device, close, bind, ...) is the wrapped backend's.
        return getattr(self._inner, name)


def with_reshapes(backends: list[Backend], config: ModelConfigFile) -> list[Backend]:
    """Wrap each backend in a ReshapedBackend when the configuration reshapes any tensor; else as is."""
    if not (_reshapes(config.inputs) or _reshapes(config.outputs)):
        return backends
    batched = (config.max_batch_size or 0) > 0
    return [ReshapedBackend(backend, config, batched) for backend in backends]  # type: ignore[misc]
