"""TorchScript backend: ``torch.jit.load`` onto the replica's device, run under ``inference_mode``.

TorchScript files do not record tensor datatypes or shapes, so the model's
``config.toml`` must list inputs and outputs; inputs are passed positionally
in that order, and outputs are taken from a tensor, a tuple/list (in config
order) or a dict keyed by output name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tensorwire.server.backends.base import Placement
from tensorwire.server.backends.torch_module import TorchModuleBackend, check_placement


class TorchScriptBackend(TorchModuleBackend):
    """A scripted or traced PyTorch module (``torch.jit.load``); the model's config names its tensors."""

    def __init__(self, path: Path, placement: Placement) -> None:
        """Load ``path`` onto ``placement.device``; raises RuntimeError for a CUDA placement torch cannot see,
        and torch's error for a file it cannot load."""
        check_placement(placement)
        self.device = placement.device
        self._device = torch.device(placement.device)
        self._module = torch.jit.load(str(path), map_location=self._device)
        self._module.eval()
