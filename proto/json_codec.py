"""Tensors in the v2 REST protocol's JSON form: ``{"name", "datatype", "shape", "data"}`` <-> numpy arrays.

Rules (the Open Inference Protocol's REST binding, and what Triton's HTTP endpoint accepts):

- ``data`` lists the elements in row-major order, flat (``[1, 2, 3, 4]``) or nested by the shape
  (``[[1, 2], [3, 4]]``); either way the element count must match the shape.
- Booleans are ``true``/``false``; integers are JSON integers (a float is refused for an integer datatype,
  and a value outside the datatype's range is refused: numpy would wrap it); FP16/FP32/FP64 take any JSON
  number. BF16 is rounded to bfloat16 (nearest-even) and held as float32 like every BF16 tensor here.
  BYTES elements are strings, sent as their UTF-8 bytes.
- Answers write ``data`` flat. A BYTES element that is not UTF-8 has no JSON string: it is refused (ask for
  that output in binary, Triton's ``binary_data`` extension). Non-finite floats are written as ``NaN``,
  ``Infinity`` and ``-Infinity``, which Python's, RapidJSON's and orjson's readers accept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.proto.codec import (
    NUMPY_DTYPES,
    CodecError,
    bf16_bits_to_float32,
    decode_raw,
    element_count,
    float32_to_bf16_bits,
)

_INTEGER_KINDS = "iu"


def decode_json(data: Any, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """The array a JSON tensor's ``data`` holds, of ``shape`` and the dtype the server holds ``datatype`` in
    (BF16: float32 of bfloat16 values; BYTES: an object array of ``bytes``).

    Raises:
        CodecError: ``data`` is not a (nested) list of the datatype's JSON type, is ragged, holds another
            number of elements than ``shape`` needs, or holds integers outside the datatype's range.
    """
    count = element_count(shape)
    shape = tuple(shape)
    if not isinstance(data, list):
        raise CodecError(f"'data' must be a list of the tensor's elements, not {type(data).__name__}")
    try:
        values = np.asarray(data, dtype=object if datatype == "BYTES" else None)
    except (ValueError, OverflowError) as err:
        raise CodecError(f"'data' is not a regular (nested) list of numbers: {err}") from None
    if values.size != count:
        raise CodecError(f"{datatype} tensor of shape {list(shape)} needs {count} values in 'data', got {values.size}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        for index, element in enumerate(values.ravel()):
            if not isinstance(element, str):
                raise CodecError(f"BYTES element {index} must be a JSON string, not {type(element).__name__}")
            out[index] = element.encode("utf-8")
        return out.reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise CodecError(f"unknown datatype {datatype!r}")
    kind = values.dtype.kind
    if count == 0:
        kind = "b" if datatype == "BOOL" else ("i" if dtype.kind in _INTEGER_KINDS else "f")
        values = values.astype("?" if kind == "b" else "i8")
    if datatype == "BOOL":
        if kind != "b":
            raise CodecError("BOOL values must be JSON true or false")
        return values.reshape(shape)
    if kind == "b" or kind not in "iuf":
        raise CodecError(f"{datatype} values must be JSON numbers")
    if datatype == "BF16":
        return bf16_bits_to_float32(float32_to_bf16_bits(values.astype("<f4"))).reshape(shape)
    if dtype.kind in _INTEGER_KINDS:
        if kind == "f":
            raise CodecError(f"{datatype} values must be JSON integers, not fractions")
        info = np.iinfo(dtype)
        if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
            raise CodecError(f"{datatype} values fall outside [{info.min}, {info.max}]")
    return values.astype(dtype).reshape(shape)


def encode_json(raw: bytes | memoryview, datatype: str, shape: Sequence[int]) -> list:
    """The flat JSON ``data`` list of a tensor given as raw contents (what the server's outputs are).

    Raises:
        CodecError: the bytes do not match the shape, or a BYTES element is not UTF-8.
    """
    array = decode_raw(raw, datatype, shape)
    if datatype == "BYTES":
        out = []
        for index, element in enumerate(array.ravel()):
            try:
                out.append(element.decode("utf-8"))
            except UnicodeDecodeError:
                raise CodecError(
                    f"BYTES element {index} is not UTF-8 and has no JSON form; request this output in binary "
                    "(output parameter binary_data: true)"
                ) from None
        return out
    return array.ravel().tolist()
