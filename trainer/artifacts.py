"""Loading a trained model back, and running exported files, for export, quantize and publish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.trainer.config import data_spec_from
from tensorwire.trainer.data import Splits, load_splits
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import load_checkpoint

INPUT_NAME, OUTPUT_NAME = "INPUT0", "OUTPUT0"


def load_trained(path: Path):
    """The eager model in eval mode, rebuilt from its stored spec, plus the checkpoint dict."""
    from tensorwire.trainer.models import build_from_spec
    from tensorwire.trainer.structure import apply_structure

    state = load_checkpoint(path)
    spec = state["model_spec"]
    model = build_from_spec(spec)
    try:
        apply_structure(model, spec.get("structure"))
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as err:
        raise TrainerError(f"{path}: weights do not fit model {spec['name']!r}: {str(err).splitlines()[0]}") from None
    return model.eval(), state


def splits_of(state: dict[str, Any]) -> Splits:
    """The exact train/val/test split the checkpoint was trained on."""
    return load_splits(data_spec_from(state["config"]))


def onnx_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    if not Path(path).is_file():
        raise TrainerError(f"{path}: missing (run 'tensorwire export' first)")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predict_onnx(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits for all of ``x`` in batches."""
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def predict_torch(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of a torch callable (module, loaded program or package) for all of ``x`` in batches."""
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == labels).mean())
