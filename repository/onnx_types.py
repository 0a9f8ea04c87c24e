"""ONNX tensor types in the v2 protocol's datatype names: what an ONNX model file declares, in the words of
ModelMetadata and config.toml.

The keys are ONNX Runtime's type strings (``NodeArg.type``, e.g. ``"tensor(float)"``); a type missing here
(complex, float8, sequences, maps) cannot be served. This module imports no model runtime, so the server's
ONNX Runtime backend and the client-side load generators share it.
"""

from __future__ import annotations

#: ONNX Runtime type string -> v2 datatype.
ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(bfloat16)": "BF16",
    "tensor(string)": "BYTES",
}
