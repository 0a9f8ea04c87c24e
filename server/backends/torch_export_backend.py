"""``torch.export`` programs and AOTInductor packages (``model.pt2``): PyTorch's successors to TorchScript.

* backend ``torch_export``: a program saved with ``torch.export.save``; loaded with
  ``torch.export.load(...).module()`` onto the replica's device and run under ``inference_mode``.
* backend ``aotinductor``: a package from ``torch._inductor.aoti_compile_and_package`` (native
  code compiled ahead of time for one device kind); loaded with ``torch._inductor.aoti_load_package``.
  A package compiled for the CPU runs on the CPU whatever the placement, and says so in the log.

Like TorchScript files, neither records the v2 tensor names, so the model's ``config.toml`` lists
inputs and outputs; inputs are passed positionally in that order, outputs are taken from a
tensor, a tuple/list (in config order) or a dict keyed by output name. torch's intra-op pool is
process-wide: it is sized once for the largest replica. torch is imported only when a model of
one of these backends is loaded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch

from tensorwire.server.backends.base import Placement, TensorInfo

log = logging.getLogger("tensorwire.backend.torch_export")

_threads_lock = threading.Lock()
_threads_set = 0


def _set_threads(threads: int) -> None:
    global _threads_set
    with _threads_lock:
        if threads > _threads_set:
            torch.set_num_threads(threads)
            _threads_set = threads


class TorchExportBackend:
    """A ``.pt2`` file: a ``torch.export`` program (``aot=False``) or an AOTInductor package (``aot=True``)."""

    inputs: list[TensorInfo] | None = None
    outputs: list[TensorInfo] | None = None

    def __init__(self, path: Path, placement: Placement, aot: bool = False) -> None:
        if placement.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"replica placed on {placement.device} but torch sees no CUDA device")
        _set_threads(placement.threads)
        self._device = torch.device(placement.device)
        if aot:
            index = self._device.index if self._device.type == "cuda" and self._device.index is not None else -1
            runner = torch._inductor.aoti_load_package(str(path), device_index=index)
            built_for = str(runner.get_metadata().get("AOTI_DEVICE_KEY", "cpu"))
            if built_for != self._device.type:
                log.warning(
                    "event=aoti_device model=%s placement=%s detail='package compiled for %s; running there'",
                    path,
                    placement.device,
                    built_for,
                )
                self._device = torch.device(built_for if built_for != "cuda" else "cuda:0")
            self._module = runner
        else:
            self._module = torch.export.load(str(path)).module().to(self._device)
        self.device = str(self._device) if self._device.type == "cuda" else "cpu"
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
