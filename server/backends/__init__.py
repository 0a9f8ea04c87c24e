"""Model runtimes. Each is imported only when a model needs it (torch is optional)."""

from __future__ import annotations

from pathlib import Path

from tensorwire.install_hint import install_hint
from tensorwire.server.backends.base import Backend, Placement, TensorInfo

__all__ = ["Backend", "Placement", "TensorInfo", "create_backend"]


def create_backend(kind: str, path: Path, placement: Placement) -> Backend:
    """Load the model file at ``path`` with the named backend on ``placement``."""
    if kind == "onnxruntime":
        from tensorwire.server.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, placement)
    if kind == "torchscript":
        try:
            from tensorwire.server.backends.torchscript_backend import TorchScriptBackend
        except ImportError as err:
            raise RuntimeError(f"the torchscript backend needs torch: {install_hint('torch')}") from err
        return TorchScriptBackend(path, placement)
    if kind in ("torch_export", "aotinductor"):
        try:
            from tensorwire.server.backends.torch_export_backend import TorchExportBackend
        except ImportError as err:
            raise RuntimeError(f"the {kind} backend needs torch: {install_hint('torch')}") from err
        return TorchExportBackend(path, placement, aot=kind == "aotinductor")
    if kind == "python":
        from tensorwire.server.backends.python_backend import PythonBackend

        return PythonBackend(path, placement)
    raise ValueError(f"unknown backend {kind!r}")
