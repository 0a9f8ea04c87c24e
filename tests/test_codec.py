"""The tensor codec (tensorwire.proto.codec): v2 wire bytes <-> numpy, property-tested.

Round trips are checked bitwise (NaN payloads, -0.0 and infinities included),
BF16 rounding against ml_dtypes, the BYTES framing against tritonclient's own
serializer, and every malformed input must raise CodecError with a message
that says what was wrong.
"""

from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.service_pb2 as triton_pb
import tritonclient.utils as tutils
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import (
    CONTENTS_FIELD,
    DATATYPES,
    ELEMENT_SIZE,
    NUMPY_DTYPES,
    CodecError,
    bf16_bits_to_float32,
    datatype_of,
    decode_contents,
    decode_raw,
    deserialize_bytes_tensor,
    element_count,
    encode_contents,
    encode_raw,
    float32_to_bf16_bits,
    serialize_bytes_tensor,
)

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INTS = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")
FLOATS = ("FP16", "FP32", "FP64")
FIXED = ("BOOL", *INTS, *FLOATS)  # numpy-native fixed-size types (BF16 has its own tests)
#: unsigned integer dtype with the same width, to generate every float bit pattern
_BITS_OF = {"FP16": np.dtype("<u2"), "FP32": np.dtype("<u4"), "FP64": np.dtype("<u8")}

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)


def fixed_arrays(datatype: str) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``datatype`` over every value, floats from raw bit patterns (all NaNs, ±inf, ±0)."""
    if datatype in _BITS_OF:
        bits = _BITS_OF[datatype]
        return hnp.arrays(bits, shapes).map(lambda a: a.view(NUMPY_DTYPES[datatype]))
    return hnp.arrays(NUMPY_DTYPES[datatype], shapes)


@st.composite
def fixed_tensor(draw, datatypes=FIXED):
    datatype = draw(st.sampled_from(datatypes))
    return datatype, draw(fixed_arrays(datatype))


byte_elements = st.one_of(
    st.binary(max_size=12),
    st.just(b""),
    st.binary(max_size=6).map(lambda b: b"\x00" + b + b"\x00"),  # leading, embedded and trailing NULs
    st.text(max_size=8),  # str elements encode as UTF-8 (non-ASCII, NUL and surrogate-free text)
)


@st.composite
def bytes_tensor(draw, elements=byte_elements):
    shape = draw(shapes)
    flat = draw(st.lists(elements, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape)


def utf8(element) -> bytes:
    return element.encode("utf-8") if isinstance(element, str) else bytes(element)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ------------------------------------------------------------ tables


def test_datatype_tables_cover_the_protocol():
    assert set(DATATYPES) == {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BF16",
        "BYTES",
    }
    assert ELEMENT_SIZE == {
        "BOOL": 1,
        "UINT8": 1,
        "UINT16": 2,
        "UINT32": 4,
        "UINT64": 8,
        "INT8": 1,
        "INT16": 2,
        "INT32": 4,
        "INT64": 8,
        "FP16": 2,
        "FP32": 4,
        "FP64": 8,
        "BF16": 2,
    }
    # FP16 and BF16 have no typed contents field; everything else has exactly one.
    assert set(CONTENTS_FIELD) == set(DATATYPES) - {"FP16", "BF16"}
    fields = {f.name for f in pb.InferTensorContents.DESCRIPTOR.fields}
    assert set(CONTENTS_FIELD.values()) == fields


@pytest.mark.parametrize("datatype", FIXED)
def test_datatype_of_names_each_numpy_dtype(datatype):
    dtype = NUMPY_DTYPES[datatype]
    assert datatype_of(np.zeros(2, dtype=dtype)) == datatype
    assert datatype_of(np.zeros(2, dtype=dtype.newbyteorder(">"))) == datatype


def test_datatype_of_special_kinds():
    assert datatype_of(np.array([b"a"], dtype=object)) == "BYTES"
    assert datatype_of(np.array([b"a"])) == "BYTES"
    assert datatype_of(np.array(["a"])) == "BYTES"
    assert datatype_of(np.zeros(2, dtype=ml_dtypes.bfloat16)) == "BF16"
    with pytest.raises(CodecError, match="complex128"):
        datatype_of(np.zeros(2, dtype=complex))


def test_element_count():
    assert element_count([]) == 1
    assert element_count([2, 3, 4]) == 24
    assert element_count([5, 0, 7]) == 0
    assert element_count(np.array([2, 3], dtype=np.int64)) == 6
    with pytest.raises(CodecError, match=r"negative dimension"):
        element_count([2, -1])
    with pytest.raises(CodecError, match=r"non-integer dimension 1\.5"):
        element_count([2, 1.5])


# ------------------------------------------------------------ raw round trips


@PROPERTY
@given(fixed_tensor())
def test_raw_round_trip_is_bitwise(tensor):
    datatype, array = tensor
    name, shape, raw = encode_raw(array)
    assert name == datatype
    assert shape == list(array.shape)
    assert isinstance(raw, bytes)
    assert len(raw) == array.size * ELEMENT_SIZE[datatype]
    # little-endian, row-major
    assert raw == array.astype(NUMPY_DTYPES[datatype]).tobytes(order="C")
    decoded = decode_raw(raw, name, shape)
    assert same_bits(decoded, array)


@PROPERTY
@given(fixed_tensor(), st.sampled_from(["C", "F", "T", "be"]))
def test_raw_encoding_ignores_memory_layout_and_byte_order(tensor, layout):
    datatype, array = tensor
    if layout == "F":
        other = np.array(array, order="F")
    elif layout == "T":  # a non-contiguous view with the same logical contents
        other = array.T.copy().T
    else:
        other = array.astype(array.dtype.newbyteorder(">"))
    assert encode_raw(other) == encode_raw(array)


@FEW
@given(fixed_tensor())
def test_raw_explicit_datatype(tensor):
    datatype, array = tensor
    assert encode_raw(array, datatype) == encode_raw(array)


@PROPERTY
@given(bytes_tensor())
def test_bytes_raw_round_trip(array):
    name, shape, raw = encode_raw(array)
    assert name == "BYTES"
    assert shape == list(array.shape)
    expected = [utf8(e) for e in array.ravel()]
    assert len(raw) == sum(4 + len(e) for e in expected)
    decoded = decode_raw(raw, name, shape)
    assert decoded.dtype == object
    assert decoded.shape == array.shape
    assert all(type(e) is bytes for e in decoded.ravel())
    assert list(decoded.ravel()) == expected


def test_bytes_framing_by_hand():
    array = np.array([b"", "é", b"a\x00b", b"\x00"], dtype=object).reshape(2, 2)
    raw = encode_raw(array)[2]
    assert raw == (
        b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9" + b"\x03\x00\x00\x00a\x00b" + b"\x01\x00\x00\x00\x00"
    )
    assert decode_raw(raw, "BYTES", [2, 2]).tolist() == [[b"", "é".encode()], [b"a\x00b", b"\x00"]]
    # 0-d and zero-size BYTES tensors
    assert decode_raw(b"\x01\x00\x00\x00z", "BYTES", []).item() == b"z"
    assert decode_raw(b"", "BYTES", [3, 0]).shape == (3, 0)


def test_bytes_from_numpy_string_arrays():
    assert encode_raw(np.array(["ab", "ü"]))[2] == serialize_bytes_tensor(np.array([b"ab", "ü".encode()], dtype=object))
    assert encode_raw(np.array([b"ab", b"c"]))[2] == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


# ------------------------------------------------------------ BF16

bf16_bits = hnp.arrays(np.dtype("<u2"), shapes)


@PROPERTY
@given(bf16_bits)
def test_bf16_exact_values_round_trip_via_float32(bits):
    widened = bf16_bits_to_float32(bits)
    assert widened.dtype == np.float32
    assert widened.view("<u4").tolist() == (bits.astype("<u4") << 16).tolist()
    name, shape, raw = encode_raw(widened, "BF16")
    assert name == "BF16" and shape == list(bits.shape)
    sent = np.frombuffer(raw, dtype="<u2").reshape(bits.shape)
    # every bf16 value is sent as itself: NaN payloads, -0.0 and subnormals included
    assert np.array_equal(sent, bits)
    decoded = decode_raw(raw, "BF16", shape)
    assert decoded.dtype == np.float32 and decoded.shape == bits.shape
    assert np.array_equal(decoded.view("<u4"), widened.view("<u4"))


def test_every_bf16_pattern_round_trips_via_float32():
    bits = np.arange(2**16, dtype=np.uint32).astype("<u2")
    assert np.array_equal(float32_to_bf16_bits(bf16_bits_to_float32(bits)), bits)


def _ml_dtypes_bf16(values: np.ndarray) -> np.ndarray:
    """ml_dtypes' rounding, except that a NaN bfloat16 holds exactly (low 16 bits zero) keeps its bits
    (ml_dtypes makes every NaN the quiet NaN; we keep BF16 payloads bit-exact through float32)."""
    with np.errstate(invalid="ignore", over="ignore"):
        reference = values.astype(ml_dtypes.bfloat16).view("<u2")
    bits = values.view("<u4")
    exact_nan = np.isnan(values) & ((bits & 0xFFFF) == 0)
    return np.where(exact_nan, bits >> 16, reference).astype("<u2")


@PROPERTY
@given(bf16_bits)
def test_bf16_round_trip_via_ml_dtypes(bits):
    array = bits.view(ml_dtypes.bfloat16)
    name, shape, raw = encode_raw(array)
    assert name == "BF16"
    assert raw == bits.tobytes()  # bfloat16 arrays are sent bit for bit
    decoded = decode_raw(raw, "BF16", shape, bf16_as="bfloat16")
    assert decoded.dtype == np.dtype(ml_dtypes.bfloat16)
    assert same_bits(decoded, array)
    assert same_bits(decode_raw(raw, "BF16", shape, bf16_as="bits"), bits)
    # uint16 arrays named BF16 are taken as bit patterns too
    assert encode_raw(bits, "BF16")[2] == raw


@PROPERTY
@given(hnp.arrays(np.dtype("<u4"), shapes))
def test_bf16_rounding_matches_ml_dtypes(bits):
    values = bits.view("<f4")
    reference = _ml_dtypes_bf16(values)
    assert np.array_equal(float32_to_bf16_bits(values), reference)
    assert encode_raw(values, "BF16")[2] == reference.tobytes()


def test_bf16_rounding_matches_ml_dtypes_on_many_values():
    rng = np.random.default_rng(1234)
    bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype("<u4")
    # plus every rounding boundary: the low half exactly 0x7FFF, 0x8000 (ties) and 0x8001
    high = rng.integers(0, 2**16, size=1 << 14, dtype=np.uint64).astype("<u4") << 16
    bits = np.concatenate([bits, high | 0x7FFF, high | 0x8000, high | 0x8001, high])
    values = bits.view("<f4")
    assert np.array_equal(float32_to_bf16_bits(values), _ml_dtypes_bf16(values))


@pytest.mark.parametrize(
    ("f32_bits", "bf16"),
    [
        (0x3F800000, 0x3F80),  # 1.0 exact
        (0x3F808000, 0x3F80),  # tie, even below: down
        (0x3F818000, 0x3F82),  # tie, odd below: up to even
        (0x3F808001, 0x3F81),  # just above the tie: up
        (0x3F807FFF, 0x3F80),  # just below the tie: down
        (0x7F7FFFFF, 0x7F80),  # the largest float32 rounds to +inf
        (0xFF7FFFFF, 0xFF80),  # and its negative to -inf
        (0x7F800000, 0x7F80),  # +inf
        (0x80000000, 0x8000),  # -0.0 keeps its sign
        (0x00000001, 0x0000),  # the smallest subnormal rounds to zero
        (0x00018000, 0x0002),  # subnormal tie, odd below: up
        (0x7F800001, 0x7FC0),  # signalling NaN bfloat16 cannot hold -> quiet NaN
        (0xFFC12345, 0xFFC0),  # negative NaN keeps its sign
        (0x7F810000, 0x7F81),  # a bfloat16 signalling NaN, widened: kept exactly
        (0xFFA50000, 0xFFA5),  # a negative bfloat16 NaN payload: kept exactly
    ],
)
def test_bf16_rounding_cases(f32_bits, bf16):
    value = np.array([f32_bits], dtype="<u4").view("<f4")
    assert float32_to_bf16_bits(value).tolist() == [bf16]


def test_bf16_from_float64_and_ints():
    name, _, raw = encode_raw(np.array([1.0, -2.0, 0.5]), "BF16")
    assert np.frombuffer(raw, "<u2").tolist() == [0x3F80, 0xC000, 0x3F00]
    assert np.frombuffer(encode_raw(np.array([3], dtype=np.int32), "BF16")[2], "<u2").tolist() == [0x4040]


# ------------------------------------------------------------ typed contents

CONTENT_TYPES = ("BOOL", *INTS, "FP32", "FP64")


@PROPERTY
@given(fixed_tensor(CONTENT_TYPES))
def test_contents_round_trip(tensor):
    datatype, array = tensor
    name, shape, contents = encode_contents(array)
    assert name == datatype and shape == list(array.shape)
    assert isinstance(contents, pb.InferTensorContents)
    # only the datatype's own field is filled
    for field in pb.InferTensorContents.DESCRIPTOR.fields:
        expected = array.size if field.name == CONTENTS_FIELD[datatype] else 0
        assert len(getattr(contents, field.name)) == expected, field.name
    # through the wire and back
    wire = pb.InferTensorContents.FromString(contents.SerializeToString())
    decoded = decode_contents(wire, name, shape)
    assert decoded.dtype == NUMPY_DTYPES[datatype] and decoded.shape == array.shape
    if datatype in ("FP32", "FP64"):
        nan = np.isnan(array)
        assert np.array_equal(np.isnan(decoded), nan)
        # every non-NaN value bit for bit (-0.0 and infinities included)
        assert decoded[~nan].tobytes() == array[~nan].tobytes()
    else:
        assert same_bits(decoded, array)


@PROPERTY
@given(bytes_tensor())
def test_bytes_contents_round_trip(array):
    name, shape, contents = encode_contents(array)
    assert name == "BYTES" and shape == list(array.shape)
    assert list(contents.bytes_contents) == [utf8(e) for e in array.ravel()]
    wire = pb.InferTensorContents.FromString(contents.SerializeToString())
    decoded = decode_contents(wire, name, shape)
    assert decoded.dtype == object and decoded.shape == array.shape
    assert list(decoded.ravel()) == [utf8(e) for e in array.ravel()]


@FEW
@given(fixed_tensor(CONTENT_TYPES))
def test_contents_and_raw_decode_alike(tensor):
    datatype, array = tensor
    assume(datatype not in ("FP32", "FP64") or not np.isnan(array).any())
    from_raw = decode_raw(encode_raw(array)[2], datatype, list(array.shape))
    from_contents = decode_contents(encode_contents(array)[2], datatype, list(array.shape))
    assert same_bits(from_raw, from_contents)


def test_contents_accept_wider_python_ints_in_range():
    contents = pb.InferTensorContents(int_contents=[-128, 0, 127])
    assert decode_contents(contents, "INT8", [3]).tolist() == [-128, 0, 127]
    contents = pb.InferTensorContents(uint_contents=[0, 65535])
    assert decode_contents(contents, "UINT16", [2]).dtype == np.dtype("<u2")
    contents = pb.InferTensorContents(uint64_contents=[2**64 - 1])
    assert decode_contents(contents, "UINT64", []).item() == 2**64 - 1


# ------------------------------------------------------------ zero copy


@PROPERTY
@given(fixed_tensor())
def test_decode_raw_is_a_read_only_view(tensor):
    datatype, array = tensor
    assume(array.size > 0)
    _, shape, raw = encode_raw(array)
    decoded = decode_raw(raw, datatype, shape)
    assert np.shares_memory(decoded, np.frombuffer(raw, dtype=np.uint8))
    assert not decoded.flags.writeable
    with pytest.raises(ValueError):
        decoded.flat[0] = decoded.flat[0]


def test_decode_raw_views_writable_buffers_read_only():
    buffer = bytearray(np.arange(4, dtype="<i4").tobytes())
    decoded = decode_raw(buffer, "INT32", [2, 2])
    assert not decoded.flags.writeable
    buffer[0] = 9  # the array is a view: it sees the change
    assert decoded[0, 0] == 9
    view = decode_raw(memoryview(bytes(16)), "FP32", [4])
    assert not view.flags.writeable
    bits = decode_raw(bytes(4), "BF16", [2], bf16_as="bits")
    assert not bits.flags.writeable and np.shares_memory(bits, bits.base)
    assert not decode_raw(bytes(4), "BF16", [2], bf16_as="bfloat16").flags.writeable


def test_decode_raw_counts_bytes_of_any_buffer():
    # a memoryview whose items are not bytes: sizes are still checked in bytes
    floats = np.arange(3, dtype="<f4")
    decoded = decode_raw(memoryview(floats), "FP32", [3])
    assert decoded.tolist() == [0.0, 1.0, 2.0]
    assert np.shares_memory(decoded, floats)
    assert decode_raw(memoryview(encode_raw(np.array([b"ab"], dtype=object))[2]), "BYTES", [1]).tolist() == [b"ab"]


# ------------------------------------------------------------ errors


def test_wrong_byte_size():
    with pytest.raises(CodecError, match=r"FP32 tensor of shape \[2\] needs 8 bytes of raw contents, got 7"):
        decode_raw(bytes(7), "FP32", [2])
    with pytest.raises(CodecError, match=r"needs 0 bytes.*got 1"):
        decode_raw(b"\x00", "INT8", [0])
    with pytest.raises(CodecError, match=r"needs 16 bytes.*got 17"):  # trailing bytes of a fixed-size tensor
        decode_raw(bytes(17), "INT64", [2])


def test_truncated_bytes_length_prefix():
    with pytest.raises(CodecError, match="4-byte length prefix"):
        decode_raw(b"\x01\x00", "BYTES", [1])
    # the first element is whole, the second's prefix is cut short
    with pytest.raises(CodecError, match=r"end after 1 of 2 elements \(missing 4-byte length prefix\)"):
        decode_raw(struct.pack("<I", 3) + b"abc" + b"\x01\x00", "BYTES", [2])


def test_bytes_element_past_the_end():
    with pytest.raises(CodecError, match="BYTES element 0 declares 10 bytes but only 3 remain"):
        decode_raw(struct.pack("<I", 10) + b"abc", "BYTES", [1])
    with pytest.raises(CodecError, match="BYTES element 1 declares 4294967295 bytes"):
        decode_raw(struct.pack("<I", 0) + struct.pack("<I", 2**32 - 1) + b"x", "BYTES", [2])


def test_bytes_trailing_bytes():
    with pytest.raises(CodecError, match="2 bytes after the 1 declared elements"):
        decode_raw(struct.pack("<I", 1) + b"a" + b"zz", "BYTES", [1])
    with pytest.raises(CodecError, match="5 bytes after the 0 declared elements"):
        decode_raw(struct.pack("<I", 1) + b"a", "BYTES", [0])


def test_bytes_huge_shape_is_rejected_before_allocating():
    # 2**40 elements would need terabytes just for the object array; the
    # size check must come first and say why.
    with pytest.raises(CodecError, match=r"cannot hold 1099511627776 elements"):
        decode_raw(b"\x00" * 8, "BYTES", [2**20, 2**20])
    with pytest.raises(CodecError, match="negative"):
        deserialize_bytes_tensor(b"", -1)


def test_negative_dims():
    for datatype in ("FP32", "BYTES", "BF16"):
        with pytest.raises(CodecError, match=r"shape \[2, -1\] has a negative dimension"):
            decode_raw(b"", datatype, [2, -1])
    with pytest.raises(CodecError, match="negative dimension"):
        decode_contents(pb.InferTensorContents(), "INT32", [-1])


def test_unknown_datatype():
    for call in (
        lambda: decode_raw(b"", "FP8", [0]),
        lambda: encode_raw(np.zeros(2), "FP8"),
        lambda: decode_contents(pb.InferTensorContents(), "FP8", [0]),
        lambda: encode_contents(np.zeros(2), "FP8"),
        lambda: decode_raw(b"", "fp32", [0]),  # names are case-sensitive
    ):
        with pytest.raises(CodecError, match=r"unknown datatype '(FP8|fp32)'; expected one of BOOL, .*BYTES"):
            call()


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_half_floats_only_travel_raw(datatype):
    with pytest.raises(CodecError, match=f"{datatype} tensors can only travel as raw contents"):
        decode_contents(pb.InferTensorContents(fp32_contents=[1.0]), datatype, [1])
    array = np.ones(2, dtype=np.float16 if datatype == "FP16" else ml_dtypes.bfloat16)
    with pytest.raises(CodecError, match=f"{datatype} tensors can only travel as raw contents"):
        encode_contents(array)


@pytest.mark.parametrize(
    ("datatype", "field", "values", "limits"),
    [
        ("UINT8", "uint_contents", [1, 300], r"\[0, 255\]"),
        ("UINT16", "uint_contents", [70000], r"\[0, 65535\]"),
        ("INT8", "int_contents", [-129], r"\[-128, 127\]"),
        ("INT8", "int_contents", [200], r"\[-128, 127\]"),
        ("INT16", "int_contents", [40000], r"\[-32768, 32767\]"),
    ],
)
def test_out_of_range_contents(datatype, field, values, limits):
    contents = pb.InferTensorContents(**{field: values})
    with pytest.raises(CodecError, match=f"{datatype} values in {field} fall outside {limits}"):
        decode_contents(contents, datatype, [len(values)])


def test_contents_count_mismatch():
    with pytest.raises(CodecError, match=r"INT32 tensor of shape \[2, 2\] needs 4 values in int_contents, got 3"):
        decode_contents(pb.InferTensorContents(int_contents=[1, 2, 3]), "INT32", [2, 2])
    with pytest.raises(CodecError, match="needs 1 values in bytes_contents, got 0"):
        decode_contents(pb.InferTensorContents(), "BYTES", [])


def test_bool_raw_byte_2():
    with pytest.raises(CodecError, match="BOOL raw contents may hold only the bytes 0 and 1"):
        decode_raw(b"\x00\x01\x02", "BOOL", [3])
    assert decode_raw(b"\x00\x01", "BOOL", [2]).tolist() == [False, True]


def test_unknown_bf16_as():
    with pytest.raises(CodecError, match="bf16_as must be one of float32, bits, bfloat16, not 'fp32'"):
        decode_raw(bytes(2), "BF16", [1], bf16_as="fp32")


@pytest.mark.parametrize("encode", [encode_raw, encode_contents], ids=["raw", "contents"])
def test_encode_refuses_integers_that_do_not_fit(encode):
    with pytest.raises(CodecError, match=r"values in \[1, 300\] do not fit UINT8 \(range \[0, 255\]\)"):
        encode(np.array([1, 300]), "UINT8")
    with pytest.raises(CodecError, match="do not fit UINT32"):
        encode(np.array([-1], dtype=np.int8), "UINT32")
    with pytest.raises(CodecError, match="do not fit INT64"):
        encode(np.array([2**63], dtype=np.uint64), "INT64")
    # in range: cast as asked
    assert encode(np.array([0, 255]), "UINT8")[0] == "UINT8"


@pytest.mark.parametrize("encode", [encode_raw, encode_contents], ids=["raw", "contents"])
def test_encode_refuses_floats_as_integers(encode):
    with pytest.raises(CodecError, match="cannot send a float64 array as INT32"):
        encode(np.array([1.7]), "INT32")
    with pytest.raises(CodecError, match="cannot send a float32 array as BOOL"):
        encode(np.array([1.0], dtype=np.float32), "BOOL")
    with pytest.raises(CodecError, match="cannot send a <U1 array as FP32"):
        encode(np.array(["a"]), "FP32")


def test_encode_bytes_rejects_non_bytes_elements():
    with pytest.raises(CodecError, match="a BYTES element must be bytes or str, not int"):
        encode_raw(np.array([1, 2], dtype=object))
    with pytest.raises(CodecError, match="must be bytes or str, not float"):
        encode_contents(np.array([1.5], dtype=object), "BYTES")
    with pytest.raises(CodecError, match="cannot send a <U1 array as BF16"):
        encode_raw(np.array(["a"]), "BF16")


def test_encode_widening_conversions_are_allowed():
    assert decode_raw(encode_raw(np.array([1, 2], dtype=np.int8), "FP32")[2], "FP32", [2]).tolist() == [
        1.0,
        2.0,
    ]
    assert decode_raw(encode_raw(np.array([True]), "INT32")[2], "INT32", [1]).tolist() == [1]
    assert decode_raw(encode_raw(np.array([1.5]), "FP16")[2], "FP16", [1]).tolist() == [1.5]
    assert encode_raw(np.zeros(1, ml_dtypes.bfloat16) + 2, "FP32")[2] == np.float32(2).tobytes()


def test_codec_error_is_a_value_error():
    assert issubclass(CodecError, ValueError)
    assert codec.CodecError is CodecError


# ------------------------------------------------------------ tritonclient interop

triton_bytes_elements = st.one_of(st.binary(max_size=12), st.text(max_size=8))


@PROPERTY
@given(bytes_tensor(triton_bytes_elements))
def test_bytes_serialization_matches_tritonclient(array):
    theirs = tutils.serialize_byte_tensor(array)
    ours = serialize_bytes_tensor(array)
    assert ours == (theirs.item() if theirs.size else b"")
    back = tutils.deserialize_bytes_tensor(ours)
    assert [bytes(e) for e in back] == [utf8(e) for e in array.ravel()]
    assert list(deserialize_bytes_tensor(ours, array.size)) == [utf8(e) for e in array.ravel()]


@PROPERTY
@given(fixed_tensor())
def test_tritonclient_inputs_decode_with_ours(tensor):
    datatype, array = tensor
    assert tutils.np_to_triton_dtype(array.dtype) == datatype
    infer_input = tgrpc.InferInput("INPUT0", list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    raw = infer_input._get_content()
    decoded = decode_raw(raw, infer_input.datatype(), infer_input.shape())
    assert same_bits(decoded, array)


@FEW
@given(bf16_bits)
def test_tritonclient_bf16_inputs_decode_with_ours(bits):
    array = bits.view(ml_dtypes.bfloat16)
    infer_input = tgrpc.InferInput("INPUT0", list(array.shape), "BF16")
    infer_input.set_data_from_numpy(array)
    raw = infer_input._get_content()
    assert same_bits(decode_raw(raw, "BF16", infer_input.shape(), bf16_as="bfloat16"), array)
    assert same_bits(decode_raw(raw, "BF16", infer_input.shape()), bf16_bits_to_float32(bits))


@FEW
@given(bytes_tensor(triton_bytes_elements))
def test_tritonclient_bytes_inputs_decode_with_ours(array):
    infer_input = tgrpc.InferInput("INPUT0", list(array.shape), "BYTES")
    infer_input.set_data_from_numpy(array)
    decoded = decode_raw(infer_input._get_content(), "BYTES", infer_input.shape())
    assert decoded.shape == array.shape
    assert list(decoded.ravel()) == [utf8(e) for e in array.ravel()]


@PROPERTY
@given(st.one_of(fixed_tensor((*FIXED,)), bytes_tensor(triton_bytes_elements).map(lambda a: ("BYTES", a))))
def test_tritonclient_reads_our_raw_outputs(tensor):
    datatype, array = tensor
    name, shape, raw = encode_raw(array)
    response = triton_pb.ModelInferResponse()
    response.outputs.add(name="OUTPUT0", datatype=name, shape=shape)
    response.raw_output_contents.append(raw)
    theirs = tgrpc.InferResult(response).as_numpy("OUTPUT0")
    assert theirs.shape == array.shape
    if datatype == "BYTES":
        assert [bytes(e) for e in theirs.ravel()] == [utf8(e) for e in array.ravel()]
    else:
        assert same_bits(theirs, array.astype(NUMPY_DTYPES[datatype]))
