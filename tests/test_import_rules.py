"""Who may import whom (ARCHITECTURE.md): checked in fresh interpreters, so nothing else loaded them first."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def modules_after_import(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    ["tensorwire.server.app", "tensorwire.server.servicer", "tensorwire.server.cli"],
)
def test_the_server_never_imports_the_client_the_trainer_or_torch(module):
    loaded = modules_after_import(module)
    assert not {m for m in loaded if m.startswith(("tensorwire.client", "tensorwire.trainer"))}
    assert "torch" not in loaded  # the TorchScript backend loads torch only when a model needs it


@pytest.mark.parametrize(
    "module",
    [
        "tensorwire.server.manager",
        "tensorwire.server.dataplane",
        "tensorwire.server.http_frontend",
        "tensorwire.server.engine_service",
        "tensorwire.server.remote_engine",
        "tensorwire.server.ipc",
    ],
)
def test_the_batching_core_the_data_plane_and_the_http_front_end_import_no_grpc(module):
    """The request rules are transport-neutral: only the gRPC front-end (servicer, listeners, app) imports
    grpc; the engine process's IPC service and the front-ends' remote engine neither."""
    loaded = modules_after_import(module)
    assert not {m for m in loaded if m == "grpc" or m.startswith("grpc.")}


def test_a_front_end_process_loads_no_model_runtime():
    """Front-end processes (--workers N) validate and decode; models run in the engine process only."""
    loaded = modules_after_import("tensorwire.server.frontend_process")
    assert not {m for m in loaded if m.split(".")[0] in ("onnxruntime", "torch", "tensorwire.client")}
    assert not {m for m in loaded if m.startswith(("tensorwire.client", "tensorwire.trainer"))}


def test_the_repository_format_imports_neither_server_nor_trainer_nor_runtimes():
    loaded = modules_after_import("tensorwire.repository")
    assert not {m for m in loaded if m.startswith(("tensorwire.server", "tensorwire.trainer", "tensorwire.client"))}
    assert not {m for m in loaded if m in ("grpc", "torch", "onnxruntime")}
