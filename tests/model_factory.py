"""Small, real model files for tests: ONNX graphs built with onnx.helper, and Python models.

Each builder writes ``<repo>/<name>/config.toml`` and ``<repo>/<name>/<version>/<file>``
so that the server loads them exactly as it loads a trainer-published model.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tomli_w
from onnx import TensorProto, helper

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BF16": TensorProto.BFLOAT16,
    "BYTES": TensorProto.STRING,
}


def write_config(repo: Path, name: str, config: dict[str, Any]) -> Path:
    model_dir = Path(repo) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.toml").write_text(tomli_w.dumps(config))
    return model_dir


def _save(model: onnx.ModelProto, repo: Path, name: str, version: int) -> Path:
    path = Path(repo) / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _value(name: str, datatype: str, shape: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, ONNX_TYPES[datatype], shape)


def onnx_identity(
    repo: Path,
    name: str = "identity",
    datatype: str = "FP32",
    dims: list[int] = (16,),
    max_batch_size: int = 64,
    version: int = 1,
    **config: Any,
) -> Path:
    """OUTPUT0 = INPUT0, any datatype; batched when max_batch_size > 0."""
    shape = (["batch"] if max_batch_size else []) + list(dims)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        name,
        [_value("INPUT0", datatype, shape)],
        [_value("OUTPUT0", datatype, shape)],
    )
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": max_batch_size, **config})
    return _save(helper.make_model(graph), repo, name, version)


def onnx_add_sub(
    repo: Path,
    name: str = "add_sub",
    max_batch_size: int = 8,
    version: int = 1,
    datatype: str = "FP32",
    **config: Any,
) -> Path:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 on [batch, 16]."""
    shape = (["batch"] if max_batch_size else []) + [16]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        name,
        [_value("INPUT0", datatype, shape), _value("INPUT1", datatype, shape)],
        [_value("OUTPUT0", datatype, shape), _value("OUTPUT1", datatype, shape)],
    )
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": max_batch_size, **config})
    return _save(helper.make_model(graph), repo, name, version)


def onnx_gather(repo: Path, name: str = "lookup", max_batch_size: int = 16, version: int = 1, **config: Any) -> Path:
    """OUTPUT0[b] = TABLE[INDEX[b]] with a 10-entry table: an index >= 10 makes ORT raise."""
    table = helper.make_tensor("TABLE", TensorProto.FLOAT, [10], np.arange(10, dtype=np.float32) * 10)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["TABLE", "INDEX"], ["OUTPUT0"], axis=0)],
        name,
        [_value("INDEX", "INT64", ["batch", 1])],
        [_value("OUTPUT0", "FP32", ["batch", 1])],
        initializer=[table],
    )
    write_config(repo, name, {"backend": "onnxruntime", "max_batch_size": max_batch_size, **config})
    return _save(helper.make_model(graph), repo, name, version)


def python_model(repo: Path, name: str, source: str, config: dict[str, Any], version: int = 1) -> Path:
    """A Python-backend model: ``source`` defines ``class Model`` with ``execute(inputs) -> outputs``."""
    write_config(repo, name, {"backend": "python", **config})
    path = Path(repo) / name / str(version) / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


SLEEPER_SOURCE = '''
import time
import numpy as np

LOG = {log!r}
INIT_S = {init_s!r}


class Model:
    """Echoes ID; sleeps max(SLEEP_MS) per execution; logs every executed ID; raises on ID 13."""

    def __init__(self):
        time.sleep(INIT_S)

    def execute(self, inputs):
        ids = inputs["ID"][:, 0].tolist()
        with open(LOG, "a") as log:
            log.write(" ".join(map(str, ids)) + "\\n")
        if 13 in ids:
            raise ValueError("unlucky 13: this text must stay in the server log")
        time.sleep(float(inputs["SLEEP_MS"].max()) / 1000.0)
        return {{"ID_OUT": inputs["ID"].copy()}}
'''


def sleeper_model(
    repo: Path,
    name: str = "sleeper",
    log: Path | None = None,
    init_s: float = 0.0,
    max_batch_size: int = 8,
    **config: Any,
) -> Path:
    """A Python model that counts its executions in ``log`` (one line per backend call).

    Inputs ID (INT64 [1]) and SLEEP_MS (FP32 [1]); output ID_OUT (INT64 [1]).
    """
    log = log or Path(repo) / f"{name}.calls"
    python_model(
        repo,
        name,
        SLEEPER_SOURCE.format(log=str(log), init_s=init_s),
        {
            "max_batch_size": max_batch_size,
            "inputs": [
                {"name": "ID", "datatype": "INT64", "dims": [1]},
                {"name": "SLEEP_MS", "datatype": "FP32", "dims": [1]},
            ],
            "outputs": [{"name": "ID_OUT", "datatype": "INT64", "dims": [1]}],
            "warmup": "none",
            **config,
        },
    )
    return log


def executed_ids(log: Path) -> list[int]:
    """Every ID a sleeper model executed, in order."""
    if not Path(log).exists():
        return []
    return [int(tok) for line in Path(log).read_text().split("\n") for tok in line.split()]


def wait_started(log: Path, ident: int, timeout_s: float = 60.0) -> None:
    """Wait until a sleeper model has started executing ``ident`` (it logs the IDs of a run before it
    sleeps): from then on its replica is busy for that request's SLEEP_MS. Raises AssertionError after
    ``timeout_s`` seconds. The synchronisation for tests that need a replica to be busy (never a fixed sleep,
    which a loaded machine outlasts)."""
    deadline = time.monotonic() + timeout_s
    while ident not in executed_ids(log):
        if time.monotonic() > deadline:
            raise AssertionError(f"the sleeper did not start request {ident} within {timeout_s} s")
        time.sleep(0.02)
