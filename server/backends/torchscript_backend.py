"""TorchScript backend: ``torch.jit.load`` onto the replica's device, run under ``inference_mode``.

TorchScript files do not record tensor datatypes or shapes, so the model's
``config.toml`` must list inputs and outputs; inputs are passed positionally
in that order, and outputs are taken from a tensor, a tuple/list (in config
order) or a dict keyed by output name.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch

from tensorwire.server.backends.base import Placement, TensorInfo

_V2_TO_TORCH = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "FP64": torch.float64,
    "BF16": torch.bfloat16,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
}
_threads_lock = threading.Lock()
_threads_set = 0


def _set_threads(threads: int) -> None:
    """torch's intra-op pool is process-wide: size it once for the largest replica."""
    global _threads_set
    with _threads_lock:
        if threads > _threads_set:
            torch.set_num_threads(threads)
            _threads_set = threads


class TorchScriptBackend:
    """A scripted or traced PyTorch module."""

    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None

    def __init__(self, path: Path, placement: Placement) -> None:
        if placement.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"replica placed on {placement.device} but torch sees no CUDA device")
        _set_threads(placement.threads)
        self.device = placement.device
        self._device = torch.device(placement.device)
        self._module = torch.jit.load(str(path), map_location=self._device)
        self._module.eval()
        self._input_order: list[str] = []
        self._output_order: list[str] = []

    def bind(self, input_names: list[str], output_names: list[str]) -> None:
        """Fix the positional order of inputs and outputs (from the config)."""
        self._input_order = list(input_names)
        self._output_order = list(output_names)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = []
            for name in self._input_order:
                array = inputs[name]
                if not array.flags.writeable:  # zero-copy decoded request bytes; torch wants writable memory
                    array = array.copy()
                args.append(torch.from_numpy(array).to(self._device, non_blocking=True))
            result = self._module(*args)
            if isinstance(result, torch.Tensor):
                named = {self._output_order[0]: result}
            elif isinstance(result, dict):
                named = result
            else:
                named = dict(zip(self._output_order, result, strict=False))
            return {name: named[name].detach().cpu().numpy() for name in output_names}

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
