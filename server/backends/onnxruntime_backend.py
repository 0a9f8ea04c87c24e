"""ONNX Runtime backend: one InferenceSession per replica.

The CUDA execution provider is asked for when the replica is placed on a GPU
and this onnxruntime build has it; otherwise the replica runs on the CPU and
says so in the log (onnxruntime-gpu falls back silently, so we check
``get_providers()`` ourselves).
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tensorwire.proto.codec import float32_to_bf16_bits
from tensorwire.repository.onnx_types import ONNX_DATATYPES
from tensorwire.server.backends.base import Placement, RequestDataError, TensorInfo

log = logging.getLogger("tensorwire.backend.onnxruntime")

# ONNX Runtime's statuses for inputs it rejects while running (an index past a table, lengths that do not
# broadcast, a shape a Reshape cannot take). Warm-up has run the model on zeros at every batch size before
# it serves, so at serving time these come from the request's data.
_DATA_ERRORS = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in ("InvalidArgument", "Fail")
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)
_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")
_SOURCE_LOCATION = re.compile(r"/\S+\.(?:h|cc|cpp):\d+ ")


def data_error(err: Exception) -> RequestDataError:
    """ONNX Runtime's message without its status prefix and source locations, for the client."""
    message = _SOURCE_LOCATION.sub("", _PREFIX.sub("", str(err)))
    message = message.replace("Non-zero status code returned while running ", "while running ")
    return RequestDataError(message[:400])


def _shape(dims: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)


def _infos(args: list) -> list[TensorInfo]:
    infos = []
    for arg in args:
        datatype = ONNX_DATATYPES.get(arg.type)
        if datatype is None:
            raise ValueError(f"tensor {arg.name!r} has type {arg.type}, which tensorwire cannot serve")
        infos.append(TensorInfo(arg.name, datatype, _shape(arg.shape)))
    return infos


class OnnxRuntimeBackend:
    """An ONNX model in ONNX Runtime."""

    def __init__(self, path: Path, placement: Placement) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = placement.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if not placement.spin_wait:
            # Spinning intra-op threads compete with the event loop for the same cores.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers: list = ["CPUExecutionProvider"]
        if placement.device.startswith("cuda"):
            index = int(placement.device.split(":")[1]) if ":" in placement.device else 0
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
            else:
                log.warning(
                    "event=cuda_unavailable model=%s detail='onnxruntime has no CUDA provider; running on CPU'",
                    path,
                )
        self._session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        used = self._session.get_providers()
        self.device = placement.device if used and used[0] == "CUDAExecutionProvider" else "cpu"
        if placement.device != "cpu" and self.device == "cpu":
            log.warning("event=cuda_fallback model=%s providers=%s", path, used)
        self.inputs = _infos(self._session.get_inputs())
        self.outputs = _infos(self._session.get_outputs())
        self._string_inputs = {t.name for t in self.inputs if t.datatype == "BYTES"}
        self._string_outputs = {t.name for t in self.outputs if t.datatype == "BYTES"}
        self._bf16 = {t.name for t in self.inputs + self.outputs if t.datatype == "BF16"}

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the session (see ``Backend.run``); ONNX Runtime's INVALID_ARGUMENT and FAIL statuses
        become ``RequestDataError``."""
        feeds = {}
        for name, array in inputs.items():
            if name in self._string_inputs:
                # ONNX Runtime string tensors take str; bytes would become "b'...'". Requests were
                # checked to be UTF-8 before batching (ModelVersion.utf8_inputs).
                array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
            feeds[name] = array
        try:
            if self._bf16:
                return self._run_bf16(feeds, output_names)
            results = self._session.run(output_names, feeds)
        except _DATA_ERRORS as err:
            raise data_error(err) from err
        out = {}
        for name, value in zip(output_names, results, strict=True):
            if name in self._string_outputs:
                value = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
            out[name] = value
        return out

    def _run_bf16(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """numpy has no bfloat16 that onnxruntime accepts: pass bit patterns through OrtValues.

        BF16 inputs arrive as float32 (exact widening); BF16 outputs leave as uint16 bit
        patterns, which the codec sends unchanged.
        """
        values = {}
        for name, array in feeds.items():
            if name in self._bf16:
                values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(float32_to_bf16_bits(array), 16)
            else:
                values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
        results = self._session.run_with_ort_values(output_names, values)
        out = {}
        for name, value in zip(output_names, results, strict=True):
            if name in self._bf16:
                shape = value.shape()
                count = math.prod(shape)
                buffer = (ctypes.c_uint16 * count).from_address(value.data_ptr()) if count else b""
                out[name] = np.frombuffer(buffer, dtype="<u2").copy().reshape(shape)
            else:
                out[name] = value.numpy()
                if name in self._string_outputs:
                    out[name] = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(out[name])
        return out

    def close(self) -> None:
        self._session = None
