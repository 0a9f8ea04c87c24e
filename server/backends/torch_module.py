"""What the torch backends share: a module called with the config's inputs in order, its result named.

TorchScript files, ``torch.export`` programs and AOTInductor packages do not record the v2 tensor names,
so the model's ``config.toml`` lists inputs and outputs: inputs are passed positionally in that order, and
outputs are taken from a tensor (the first configured output), a tuple/list (in config order) or a dict keyed
by output name. torch is imported only when a model of one of these backends is loaded.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from tensorwire.server.backends.base import Placement, TensorInfo

_threads_lock = threading.Lock()
_threads_set = 0


def set_threads(threads: int) -> None:
    """Size torch's intra-op pool to at least ``threads``: the pool is process-wide, so it is sized once, for
    the largest replica of any torch backend in the process."""
    global _threads_set
    with _threads_lock:
        if threads > _threads_set:
            torch.set_num_threads(threads)
            _threads_set = threads


def check_placement(placement: Placement) -> None:
    """Raise RuntimeError when ``placement`` names a CUDA device and torch sees none; size the thread pool."""
    if placement.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"replica placed on {placement.device} but torch sees no CUDA device")
    set_threads(placement.threads)


class TorchModuleBackend:
    """A callable torch module on ``_device``; subclasses load ``_module`` and set ``device`` (see ``Backend``)."""

    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None
    device: str
    _device: torch.device
    _module: Any
    _input_order: tuple[str, ...] = ()  # set by bind
    _output_order: tuple[str, ...] = ()

    def bind(self, input_names: list[str], output_names: list[str]) -> None:
        """Fix the positional order of inputs and outputs (from the config)."""
        self._input_order = tuple(input_names)
        self._output_order = tuple(output_names)

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """One call of the module under ``inference_mode``; arrays as ``Backend.run`` describes (batch dimension
        first for batched models). Returns the named outputs as numpy arrays on the host; raises KeyError when
        the module's result lacks a requested output, and whatever the module raises (a model fault)."""
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
        """Drop the module (and CUDA's cached blocks when it ran on a GPU)."""
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
