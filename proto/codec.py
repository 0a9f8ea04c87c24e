"""The tensor codec: v2 protocol tensors <-> numpy arrays, shared by server and client.

Wire rules (Open Inference Protocol): raw contents are little-endian and
row-major; a BYTES tensor is its elements each prefixed by a 4-byte
little-endian length; FP16 and BF16 travel raw only. Decoding fixed-size
types is zero-copy (``np.frombuffer``): the arrays returned are read-only views
of the message's bytes.

numpy has no bfloat16: BF16 tensors decode to float32 (exact, the bf16 bits
shifted into the high half) unless ``ml_dtypes`` is installed and its
``bfloat16`` dtype is asked for; float32 arrays encode to BF16 with
round-to-nearest-even when the caller names the datatype ``"BF16"``. Values
that bfloat16 holds exactly (every widened BF16 value, NaN payloads, signed
zeros and subnormals included) encode back to the same bits, so BF16 passes
bit-exact through a float32 detour.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.proto import inference_pb2 as pb

#: v2 datatype name -> numpy dtype (little-endian). BF16 and BYTES are special.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # bit patterns on the wire; see module docstring
    "BYTES": np.dtype(object),
}
DATATYPES: tuple[str, ...] = tuple(NUMPY_DTYPES)

#: Bytes per element on the wire (BYTES is variable).
ELEMENT_SIZE: dict[str, int] = {name: dtype.itemsize for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}

#: Which InferTensorContents field carries each datatype (FP16/BF16: none).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH = struct.Struct("<I")
CONTENTS_FIELD_NUMBER_FP32 = pb.InferTensorContents.DESCRIPTOR.fields_by_name["fp32_contents"].number


class CodecError(ValueError):
    """A tensor's bytes do not match its declared datatype and shape."""


def element_count(shape: Sequence[int]) -> int:
    """Number of elements in a tensor of ``shape`` (any rank; ``[]`` is a scalar: 1).

    Raises:
        CodecError: a dimension is negative (-1 means "variable" in metadata, never in a
            tensor sent) or not an integer.
    """
    count = 1
    for dim in shape:
        try:
            dim = operator.index(dim)
        except TypeError:
            raise CodecError(f"shape {list(shape)} has a non-integer dimension {dim!r}") from None
        if dim < 0:
            raise CodecError(f"shape {list(shape)} has a negative dimension; tensors sent must be concrete")
        count *= dim
    return count


_BF16_AS = ("float32", "bits", "bfloat16")
#: Datatypes whose raw bytes need no check beyond their length (BOOL, BF16 and BYTES do).
_ZERO_COPY = {name: NUMPY_DTYPES[name] for name in ELEMENT_SIZE if name not in ("BOOL", "BF16")}


def _byte_view(raw: bytes | memoryview) -> memoryview:
    """A flat unsigned-byte view of ``raw`` (so lengths and offsets count bytes)."""
    try:
        return memoryview(raw).cast("B")
    except TypeError as err:
        raise CodecError(f"raw contents must be a contiguous bytes-like buffer: {err}") from None


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name for a numpy array's dtype (any shape; byte order ignored).

    ``object``/``str``/``bytes`` arrays are BYTES, ``ml_dtypes.bfloat16`` arrays BF16,
    float16/32/64 FP16/32/64, and so on (``NUMPY_DTYPES``).

    Raises:
        CodecError: the dtype has no v2 datatype (complex, datetime, structured, ...).
    """
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    if array.dtype.name == "bfloat16":
        return "BF16"
    for name, dtype in NUMPY_DTYPES.items():
        if name not in ("BF16", "BYTES") and array.dtype.newbyteorder("<") == dtype:
            return name
    raise CodecError(f"numpy dtype {array.dtype} has no v2 datatype")


# ----------------------------------------------------------------- BYTES


def _as_bytes(element: Any) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, (bytearray, memoryview, np.bytes_)):
        return bytes(element)
    raise CodecError(f"a BYTES element must be bytes or str, not {type(element).__name__}")


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """A BYTES tensor as raw contents: each element, row-major, after its 4-byte little-endian length.

    ``array`` has any shape; its elements are ``bytes`` (or ``str``, encoded as UTF-8).

    Raises:
        CodecError: an element is neither bytes nor str, or is 4 GiB or longer.
    """
    parts: list[bytes] = []
    for element in np.asarray(array, dtype=object).ravel(order="C"):
        data = _as_bytes(element)
        if len(data) > 0xFFFFFFFF:
            raise CodecError(f"a BYTES element of {len(data)} bytes does not fit the 4-byte length prefix")
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Split length-prefixed BYTES raw contents into a flat (1-D) object array of ``count`` ``bytes``.

    The caller reshapes it to the tensor's shape. ``count`` is checked against the buffer's
    size before anything is allocated, so a forged shape cannot reserve memory.

    Raises:
        CodecError: a length prefix is missing or overruns the buffer, or bytes are left over.
    """
    view = _byte_view(raw)
    offset, total = 0, len(view)
    if count < 0:
        raise CodecError(f"BYTES element count {count} is negative")
    if count > total // 4:
        # Checked before allocating: a forged shape must not make us reserve
        # memory for elements that cannot be there (each needs its 4-byte prefix).
        raise CodecError(
            f"BYTES contents of {total} bytes cannot hold {count} elements (each needs a 4-byte length prefix)"
        )
    out = np.empty(count, dtype=object)
    for index in range(count):
        if offset + 4 > total:
            raise CodecError(f"BYTES contents end after {index} of {count} elements (missing 4-byte length prefix)")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > total:
            raise CodecError(f"BYTES element {index} declares {length} bytes but only {total - offset} remain")
        out[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != total:
        raise CodecError(f"BYTES contents hold {total - offset} bytes after the {count} declared elements")
    return out


# ------------------------------------------------------------------ BF16


def float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (nearest-even) and return the 16-bit patterns (``<u2``).

    Any shape (0-d included); the result has the input's shape. Other float dtypes are
    converted to float32 first. A NaN whose low 16 bits are zero is a bfloat16 NaN
    widened: it keeps its payload (signalling or not) exactly. Any other NaN becomes
    the quiet NaN with its sign kept (0x7FC0 / 0xFFC0), as ml_dtypes does.
    """
    values = np.asarray(array, dtype="<f4")
    # (np.ascontiguousarray would turn a 0-d array into shape (1,))
    bits = np.ascontiguousarray(values).view("<u4").reshape(values.shape)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    rounded = (bits + rounding) >> 16
    high = bits >> 16
    nan_bits = np.where(bits & 0xFFFF, (high & 0x8000) | 0x7FC0, high)
    return np.asarray(np.where(np.isnan(values), nan_bits, rounded), dtype="<u2")


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (a ``uint16`` array of any shape) to float32, exactly; same shape."""
    return (bits.astype("<u4") << 16).view("<f4")


def _bf16_dtype() -> np.dtype | None:
    try:
        import ml_dtypes  # optional
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


# ---------------------------------------------------------------- decode


def decode_raw(
    raw: bytes | memoryview, datatype: str, shape: Sequence[int], *, bf16_as: str = "float32"
) -> np.ndarray:
    """Decode one tensor's raw contents into an array of ``shape``; zero-copy for fixed-size types.

    Args:
        raw: the tensor's bytes from ``raw_input_contents``/``raw_output_contents``.
        datatype: its v2 datatype.
        shape: its full shape as sent (batch dimension included, when there is one).
        bf16_as: ``"float32"`` (default, exact widening), ``"bits"`` (uint16 patterns) or
            ``"bfloat16"`` (needs ``ml_dtypes``).

    Returns:
        A read-only array viewing ``raw`` for fixed-size datatypes (copy it to write); an
        object array of ``bytes`` for BYTES; float32 (or as ``bf16_as`` says) for BF16.

    Raises:
        CodecError: unknown datatype, a bad shape, a byte count that does not match the
            shape, BOOL bytes other than 0 and 1, malformed BYTES contents.
    """
    fast = _ZERO_COPY.get(datatype)
    if fast is not None and type(raw) is bytes:  # the common case: protobuf hands us immutable bytes
        count = element_count(shape)
        if len(raw) != count * fast.itemsize:
            raise CodecError(
                f"{datatype} tensor of shape {list(shape)} needs {count * fast.itemsize} bytes of raw contents,"
                f" got {len(raw)}"
            )
        return np.frombuffer(raw, dtype=fast).reshape(shape)  # read-only: a view of immutable bytes
    if bf16_as not in _BF16_AS:
        raise CodecError(f"bf16_as must be one of {', '.join(_BF16_AS)}, not {bf16_as!r}")
    count = element_count(shape)
    shape = tuple(operator.index(dim) for dim in shape)
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw, count).reshape(shape)
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise CodecError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    view = _byte_view(raw)
    expected = count * dtype.itemsize
    if len(view) != expected:
        raise CodecError(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes of raw contents, got {len(view)}"
        )
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    # A view of the caller's buffer: never let a consumer write through it
    # (the buffer may be a writable bytearray or shared by other tensors).
    array.flags.writeable = False
    if datatype == "BOOL" and array.size and np.frombuffer(view, dtype="u1").max() > 1:
        raise CodecError("BOOL raw contents may hold only the bytes 0 and 1")
    if datatype == "BF16":
        return _bf16_out(array, bf16_as)
    return array


def _bf16_out(bits: np.ndarray, bf16_as: str) -> np.ndarray:
    if bf16_as == "bits":
        return bits
    if bf16_as == "bfloat16":
        dtype = _bf16_dtype()
        if dtype is None:
            raise CodecError("bf16_as='bfloat16' needs the ml_dtypes package")
        return bits.view(dtype)
    return bf16_bits_to_float32(bits)


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16/float8 types have kind "V" but are floats.
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.fields is None and "float" in dtype.name)


def _cast(array: np.ndarray, datatype: str, dtype: np.dtype) -> np.ndarray:
    """``array`` as ``dtype`` for sending as ``datatype``; refuses lossy or wrapping conversions.

    Floats never become integers or BOOL silently, and integers must fit the
    target integer type (numpy's ``astype`` would wrap 300 to 44 as UINT8).
    """
    source = array.dtype
    if source == dtype:
        return array
    if source.kind in "OSUcMm" or (source.kind == "V" and not _is_float(source)):
        raise CodecError(f"cannot send a {source} array as {datatype}")
    if _is_float(source) and dtype.kind in "iub":
        raise CodecError(f"cannot send a {source} array as {datatype} (floats are not cast to integers)")
    if source.kind in "iu" and dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            raise CodecError(f"values in [{low}, {high}] do not fit {datatype} (range [{info.min}, {info.max}])")
    return array.astype(dtype)


def decode_contents(contents: pb.InferTensorContents, datatype: str, shape: Sequence[int]) -> np.ndarray:
    """Decode typed ``InferTensorContents`` into an array of ``shape`` (a copy: repeated fields are not buffers).

    Raises:
        CodecError: FP16/BF16 (raw only), an unknown datatype, a value count that does not
            match the shape, or integers outside the datatype's range.
    """
    count = element_count(shape)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype in NUMPY_DTYPES:
            raise CodecError(f"{datatype} tensors can only travel as raw contents")
        raise CodecError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    values = getattr(contents, field)
    if len(values) != count:
        raise CodecError(f"{datatype} tensor of shape {list(shape)} needs {count} values in {field}, got {len(values)}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(tuple(shape))
    if datatype == "FP32":
        return _fp32_contents(contents, count).reshape(tuple(shape))
    dtype = NUMPY_DTYPES[datatype]
    if datatype not in ("BOOL", "FP32", "FP64"):
        info = np.iinfo(dtype)
        wide = np.asarray(values, dtype=np.int64 if info.min < 0 else np.uint64)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise CodecError(f"{datatype} values in {field} fall outside [{info.min}, {info.max}]")
        return wide.astype(dtype).reshape(tuple(shape))
    return np.asarray(values, dtype=dtype).reshape(tuple(shape))


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, offset


def _fp32_contents(contents: pb.InferTensorContents, count: int) -> np.ndarray:
    """``fp32_contents`` bit-exact, from the message's own (packed, little-endian) bytes.

    Reading the repeated field widens each value to a Python float (a C double), which quiets signalling
    NaNs; the serialized field holds the sender's four bytes per value unchanged. Falls back to the field
    when other fields are set too (a message no well-behaved sender builds).
    """
    if count and len(contents.ListFields()) == 1:
        data = contents.SerializeToString()
        tag, offset = _varint(data, 0)
        if tag == (CONTENTS_FIELD_NUMBER_FP32 << 3 | 2):
            length, offset = _varint(data, offset)
            if length == count * 4 and offset + length == len(data):
                return np.frombuffer(data, dtype="<f4", offset=offset, count=count)
    return np.asarray(contents.fp32_contents, dtype="<f4")


# ---------------------------------------------------------------- encode


def encode_raw(array: np.ndarray, datatype: str | None = None) -> tuple[str, list[int], bytes]:
    """Encode an array as ``(datatype, shape, raw bytes)`` for ``raw_input_contents``/``raw_output_contents``.

    Args:
        array: any shape (the shape is sent as it is: batch dimension included if the model batches).
        datatype: the v2 datatype to send; default: the array's own (:func:`datatype_of`).
            Another datatype casts: integers must fit the target's range, floats are never
            cast to integers or BOOL; ``"BF16"`` rounds float arrays to bfloat16 (ml_dtypes
            bfloat16 and uint16 bit-pattern arrays go as they are).

    Raises:
        CodecError: no v2 datatype for the dtype, an unknown ``datatype``, a cast that would
            lose data (see above), a BYTES element that is not bytes or str.
    """
    array = np.asarray(array)
    datatype = datatype or datatype_of(array)
    shape = [int(dim) for dim in array.shape]
    if datatype == "BYTES":
        return datatype, shape, serialize_bytes_tensor(array)
    if datatype == "BF16":
        if array.dtype.name == "bfloat16" or array.dtype == np.dtype("<u2"):
            bits = np.ascontiguousarray(array).view("<u2")
        else:
            bits = float32_to_bf16_bits(_cast(array, datatype, np.dtype("<f4")))
        return datatype, shape, bits.tobytes()
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise CodecError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    return datatype, shape, np.ascontiguousarray(_cast(array, datatype, dtype)).tobytes()


def encode_contents(
    array: np.ndarray, datatype: str | None = None
) -> tuple[str, list[int], pb.InferTensorContents]:
    """Encode an array into typed ``InferTensorContents`` (for peers that do not read raw).

    Returns ``(datatype, shape, contents)``; casting rules as in :func:`encode_raw`.

    Raises:
        CodecError: FP16/BF16 (raw only), an unknown datatype, a cast that would lose data.
    """
    array = np.asarray(array)
    datatype = datatype or datatype_of(array)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        if datatype in NUMPY_DTYPES:
            raise CodecError(f"{datatype} tensors can only travel as raw contents")
        raise CodecError(f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPES)}")
    contents = pb.InferTensorContents()
    flat = array.ravel(order="C")
    if datatype == "BYTES":
        getattr(contents, field).extend(_as_bytes(element) for element in flat)
    else:
        getattr(contents, field).extend(_cast(flat, datatype, NUMPY_DTYPES[datatype]).tolist())
    return datatype, [int(dim) for dim in array.shape], contents
