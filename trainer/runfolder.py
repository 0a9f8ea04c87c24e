"""The run folder that ties the steps together, and checkpoint I/O.

::

    <run>/fit_config.json     resolved fit options (what the workers read)
    <run>/checkpoint.pt       last epoch: model, optimizer, scheduler, epoch, RNG, config (for --resume)
    <run>/best.pt             best validation epoch: model + config (what export reads)
    <run>/metrics.jsonl       one JSON line per epoch (loss/accuracy, train and validation)
    <run>/fit_summary.json    how the last fit ended
    <run>/export/             model.onnx, model.pt (TorchScript), model.pt2 (torch.export), model.aoti.pt2
                              (AOTInductor), model.int8.onnx, tokenizer.json (text data), *_report.json

Checkpoints hold only tensors, dicts, lists, str, int, float and bool, so
``torch.load(weights_only=True)`` reads them: no pickled code runs on load.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tensorwire.trainer.errors import TrainerError

CHECKPOINT_FORMAT = "tensorwire.checkpoint/1"


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> RunFolder:
        return cls(Path(path))

    fit_config = property(lambda self: self.root / "fit_config.json")
    checkpoint = property(lambda self: self.root / "checkpoint.pt")
    best = property(lambda self: self.root / "best.pt")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    fit_summary = property(lambda self: self.root / "fit_summary.json")
    export_dir = property(lambda self: self.root / "export")
    onnx = property(lambda self: self.root / "export" / "model.onnx")
    torchscript = property(lambda self: self.root / "export" / "model.pt")
    int8 = property(lambda self: self.root / "export" / "model.int8.onnx")
    pt2 = property(lambda self: self.root / "export" / "model.pt2")
    aoti = property(lambda self: self.root / "export" / "model.aoti.pt2")
    tokenizer = property(lambda self: self.root / "export" / "tokenizer.json")
    export_report = property(lambda self: self.root / "export" / "export_report.json")
    quantize_report = property(lambda self: self.root / "export" / "quantize_report.json")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainerError(f"{path}: missing ({what})") from None
    except json.JSONDecodeError as err:
        raise TrainerError(f"{path}: not valid JSON ({err})") from None


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temp file, then rename: a crash mid-write never corrupts the last checkpoint."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "torch_version": str(torch.__version__), **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location: str = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; one-line errors for missing or foreign files."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"{path}: no such checkpoint (run 'tensorwire fit' first, or pass --run/--checkpoint)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise TrainerError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainerError(f"{path}: not a tensorwire checkpoint")
    return state
