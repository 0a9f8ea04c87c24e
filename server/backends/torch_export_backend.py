"""``torch.export`` programs and AOTInductor packages (``model.pt2``): PyTorch's successors to TorchScript.

* backend ``torch_export``: a program saved with ``torch.export.save``; loaded with
  ``torch.export.load(...).module()`` onto the replica's device and run under ``inference_mode``.
* backend ``aotinductor``: a package from ``torch._inductor.aoti_compile_and_package`` (native
  code compiled ahead of time for one device kind); loaded with ``torch._inductor.aoti_load_package``.
  A package compiled for the CPU runs on the CPU whatever the placement, and says so in the log.

Neither records the v2 tensor names, so the model's ``config.toml`` lists inputs and outputs
(``tensorwire.server.backends.torch_module`` runs them in that order and names the result).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tensorwire.server.backends.base import Placement
from tensorwire.server.backends.torch_module import TorchModuleBackend, check_placement

log = logging.getLogger("tensorwire.backend.torch_export")


class TorchExportBackend(TorchModuleBackend):
    """A ``.pt2`` file: a ``torch.export`` program (``aot=False``) or an AOTInductor package (``aot=True``)."""

    def __init__(self, path: Path, placement: Placement, aot: bool = False) -> None:
        """Load ``path`` onto ``placement.device``; raises RuntimeError for a CUDA placement torch cannot see,
        and torch's error for a file it cannot load. An AOTInductor package runs on the device it was compiled for."""
        check_placement(placement)
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
