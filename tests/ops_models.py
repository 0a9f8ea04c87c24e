"""Helpers for the operations and TorchScript tests: request building, staged version copies,
broken models, and TorchScript model files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from model_factory import write_config

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import decode_raw, encode_raw


def request(model: str, inputs: dict[str, np.ndarray], *, version: str = "", request_id: str = "",
            outputs: list[str] | None = None) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw tensors, built with the shared codec."""
    message = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype, shape, raw = encode_raw(array)
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_input_contents.append(raw)
    for name in outputs or []:
        message.outputs.add(name=name)
    return message


def decode(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        tensor.name: decode_raw(raw, tensor.datatype, list(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def add_version_atomically(repo: Path, name: str, builder, version: int, **kwargs: Any) -> Path:
    """Build ``<name>/<version>`` in a staging repository next to ``repo`` and rename it into place.

    The rename makes the whole version folder appear at once, so a polling
    server never sees a half-written model file.
    """
    repo = Path(repo)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=repo.parent))
    try:
        builder(staging, name, version=version, **kwargs)
        target = repo / name / str(version)
        os.rename(staging / name / str(version), target)
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def garbage_onnx(repo: Path, name: str, version: int = 1, **config: Any) -> Path:
    """A model whose version folder holds a model.onnx that is not an ONNX file."""
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": 8, **config})
    path = Path(repo) / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a protobuf \x00\xff\xfe" * 10)
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime (to prove nothing was touched).

    Server logs (``*.log``, written by the test harness next to the repository) are left out.
    """
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in sorted(Path(root).rglob("*"))
        if p.suffix != ".log"
    }


# ------------------------------------------------------------------ TorchScript


def linear_module(in_features: int = 16, out_features: int = 4, seed: int = 0):
    """A Linear layer with fixed, seeded weights, in eval mode."""
    import torch

    torch.manual_seed(seed)
    module = torch.nn.Linear(in_features, out_features)
    with torch.no_grad():
        module.weight.copy_(torch.randn(out_features, in_features))
        module.bias.copy_(torch.randn(out_features))
    return module.eval()


def two_output_module(in_features: int = 16, out_features: int = 4, seed: int = 1):
    """Returns (linear(x), x.sum(dim=-1, keepdim=True) * 2): a tuple of two tensors."""
    import torch

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear_module(in_features, out_features, seed)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.linear(x), x.sum(dim=-1, keepdim=True) * 2.0

    return TwoHeads().eval()


def torchscript_model(repo: Path, name: str, module, config: dict[str, Any], version: int = 1) -> Path:
    """``torch.jit.script`` the module into ``<repo>/<name>/<version>/model.pt`` with its config.toml."""
    import torch

    write_config(repo, name, {"backend": "torchscript", **config})
    path = Path(repo) / name / str(version) / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(module).save(str(path))
    return path
