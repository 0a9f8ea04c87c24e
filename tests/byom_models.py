"""Model folders as people bring them: ONNX files with no configuration, Triton-style repositories,
and the silero VAD model from its PyPI wheel (a real outside model).

Only model files are written here (plus a Triton ``config.pbtxt`` where a test asks for one): what
configuration there is, the test writes itself, so each test shows the layout it serves.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from serving import RunningServer, call

from tensorwire.proto import inference_pb2 as pb


def touch_text(path: Path, text: str) -> Path:
    """Write a text file, creating its folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def save_onnx(graph: onnx.GraphProto, path: Path) -> Path:
    """Write a checked ONNX model (opset 17, IR 8: what the installed onnxruntime reads)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def token_pooler(path: Path) -> Path:
    """A text-classifier-shaped model: INT64 ``input_ids`` and ``attention_mask`` ``[batch, seq]`` (both
    dynamic, as a Transformer exported with a dynamic sequence length) -> FP32 ``logits`` ``[batch, 2]``:
    ``logits[b] = [sum(ids * mask), sum(mask)]``."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
            helper.make_node("Cast", ["masked"], ["masked_f"], to=TensorProto.FLOAT),
            helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["masked_f", "axes"], ["total"], keepdims=1),
            helper.make_node("ReduceSum", ["mask_f", "axes"], ["count"], keepdims=1),
            helper.make_node("Concat", ["total", "count"], ["logits"], axis=1),
        ],
        "token_pooler",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    return save_onnx(graph, path)


def vector_scaler(path: Path, scale: float = 2.0) -> Path:
    """A model whose batch dimension is its whole shape: FP32 ``x`` ``[batch]`` -> ``y`` ``[batch]`` = x * scale
    (served with Triton's ``dims: [1]`` + ``reshape: { shape: [] }``)."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["y"])],
        "vector_scaler",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch"])],
        initializer=[numpy_helper.from_array(np.array(scale, np.float32), "scale")],
    )
    return save_onnx(graph, path)


def densenet_like(path: Path, channels: int = 3, size: int = 8, classes: int = 10) -> tuple[Path, np.ndarray]:
    """Shaped like the densenet_onnx model of Triton's quickstart, small: ``data_0`` ``[1, C, H, W]`` (a
    fixed batch of 1) -> 1x1 convolution -> global average pool -> ``fc6_1`` ``[1, classes, 1, 1]``.

    Returns the path and the convolution weights ``[classes, C]`` (no bias), so a test can compute
    ``fc6_1 = W @ mean_hw(x)``.
    """
    weights = np.random.default_rng(7).standard_normal((classes, channels)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["data_0", "W"], ["conv"], kernel_shape=[1, 1]),
            helper.make_node("GlobalAveragePool", ["conv"], ["fc6_1"]),
        ],
        "densenet_like",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("fc6_1", TensorProto.FLOAT, [1, classes, 1, 1])],
        initializer=[numpy_helper.from_array(weights.reshape(classes, channels, 1, 1), "W")],
    )
    return save_onnx(graph, path), weights


def densenet_pbtxt(channels: int = 3, size: int = 8, classes: int = 10) -> str:
    """The ``config.pbtxt`` of Triton quickstart's densenet_onnx (there: 3, 224, 1000), for :func:`densenet_like`'s
    shapes: a fixed batch of 1 through ``reshape``, a ``format`` and a ``label_filename`` tensorwire ignores."""
    return f"""\
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 0
input [
  {{
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {channels}, {size}, {size} ]
    reshape {{ shape: [ 1, {channels}, {size}, {size} ] }}
  }}
]
output [
  {{
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    reshape {{ shape: [ 1, {classes}, 1, 1 ] }}
    label_filename: "densenet_labels.txt"
  }}
]
"""


def add_sub(path: Path, datatype: int = TensorProto.INT32, dims: int = 16) -> Path:
    """Triton's ``simple`` example as ONNX: ``OUTPUT0 = INPUT0 + INPUT1``, ``OUTPUT1 = INPUT0 - INPUT1``,
    every tensor ``[batch, 16]``."""
    shape = ["batch", dims]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [helper.make_tensor_value_info(n, datatype, shape) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, datatype, shape) for n in ("OUTPUT0", "OUTPUT1")],
    )
    return save_onnx(graph, path)


def silero_vad_onnx(path: Path) -> Path:
    """Copy ``silero_vad.onnx`` from the installed ``silero-vad`` wheel (stateful: ``input`` [batch,
    samples], ``state`` [2, batch, 128], rank-0 ``sr``)."""
    import silero_vad

    source = Path(silero_vad.__file__).parent / "data" / "silero_vad.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, path)
    return path


def wait_settled(server: RunningServer, names: list[str], timeout: float = 120) -> dict[str, tuple[str, str]]:
    """Poll RepositoryIndex until none of ``names`` is LOADING; returns name -> (state, reason).

    Used instead of ServerReady, which may stay false while a model of the repository is UNAVAILABLE.
    """
    deadline = time.monotonic() + timeout
    rows: dict[str, tuple[str, str]] = {}
    with server.channel() as channel:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
            try:
                index = call(channel, "RepositoryIndex", pb.RepositoryIndexRequest(), timeout=2)
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.1)
                continue
            rows = {}
            for model in index.models:
                state, reason = rows.get(model.name, ("", ""))
                if state != "READY":  # a model with one READY version counts as READY
                    rows[model.name] = (model.state, model.reason)
            if all(name in rows and rows[name][0] in ("READY", "UNAVAILABLE") for name in names):
                return rows
            time.sleep(0.1)
    raise RuntimeError(f"models {names} still loading after {timeout}s: {rows}\n{server.log()}")
