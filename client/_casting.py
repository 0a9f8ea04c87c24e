"""One rule for fitting an input to the datatype a model declares: never lossy without asking.

The SDK (``InferenceClient.infer`` and the streams) and the CLI (``tensorwire infer``) both
call :func:`conform`, so a value is accepted or refused the same way everywhere:

1. A value whose own datatype is the declared one is sent as it is (no copy).
2. Widening within a family (floats to wider floats, integers to integers that hold every
   value of the source type: float16 -> FP32, int8 or uint8 -> INT32, float32 -> FP64) is
   always done; numpy's ``can_cast(..., "safe")`` decides which casts widen.
3. Values without a chosen width take the declared numeric datatype when every value
   survives. These are Python numbers (scalars, lists, JSON) and numpy's defaults float64 and
   int64 (``np.zeros``, ``np.arange``, ``np.asarray([1, 2])`` and most loaders make them
   without the user picking a width). Integers and BOOL must round-trip exactly (2**40 is
   refused for INT32, 2 for BOOL, 1.5 for INT64). Floats must keep their value or its
   shortest decimal form (0.1 stays 0.1 as FP32; 1/3 or ``np.random.rand`` data do not
   fit FP32 unrounded, and values past the type's range never become inf).
4. Everything else is refused with :class:`InvalidInputError`, naming the input, both
   datatypes and the explicit form: ``Tensor(value, "FP32")`` (or ``value.astype(...)``),
   which casts as asked (rounding floats; integers must still fit).

Why rule 3 stops at float64 and int64: a dtype like int32 or uint8 was chosen by someone,
and a chosen type that differs from the model's in kind is more often the wrong tensor
(token ids sent to an image input, 0-255 pixels to a model trained on 0-1) than a width to
adapt. BYTES inputs take ``str``/``bytes``/object arrays only; numbers are not turned into
text implicitly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorwire.client._convert import datatype_for
from tensorwire.client.errors import InvalidInputError
from tensorwire.client.results import Tensor
from tensorwire.proto import codec

#: numpy's default dtypes: what Python numbers become and what numpy makes when no width is asked for.
UNCHOSEN_DTYPES = (np.dtype(np.float64), np.dtype(np.int64))
#: Values checked per pass when looking for one that does not fit (a wrong array is refused early).
_CHUNK = 4096


def _family(datatype: str) -> str:
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        return "float"
    if datatype == "BOOL":
        return "bool"
    if datatype == "BYTES":
        return "bytes"
    return "integer"


def _how_to_ask(datatype: str, source: np.dtype, them: str = "them") -> str:
    """How to send ``source`` values as ``datatype`` anyway, as the caller's own choice."""
    if datatype == "BF16":
        return f'to round {them}, send Tensor(value, "BF16") (or tensorwire.client.bf16(value))'
    numpy_name = f"np.{codec.NUMPY_DTYPES[datatype].name}"
    if _family(datatype) == "float":
        return f'to round {them}, send Tensor(value, "{datatype}") or value.astype({numpy_name})'
    if source.kind == "f":
        return f"to truncate {them}, send value.astype({numpy_name}) (or round {them} first as you intend)"
    if source.kind == "b" or them == "it":
        return f'to convert {them}, send Tensor(value, "{datatype}") (refused if a value does not fit)'
    return f"values outside {datatype}'s range cannot be sent as {datatype} (value.astype({numpy_name}) wraps them)"


def _article(word: str) -> str:
    return f"an {word}" if word[:1] in "aeio" else f"a {word}"


def _lost(source: np.ndarray, cast: np.ndarray) -> np.ndarray:
    """Flat mask of the values that ``cast`` (same shape) does not hold unchanged."""
    with np.errstate(all="ignore"):
        back = cast.astype(source.dtype)
    kept = back == source
    if source.dtype.kind == "f":
        kept |= np.isnan(back) & np.isnan(source)
        if cast.dtype.kind == "f":
            # Decimal input (0.1) keeps its shortest decimal form in the narrower type.
            lost = ~kept
            if lost.any():
                kept[lost] = cast[lost].astype(str).astype(source.dtype) == source[lost]
    return ~kept


def _first_lost(source: np.ndarray, target: np.dtype, bf16: bool) -> tuple[Any, str] | None:
    """The first value that ``target`` cannot hold, as ``(original, what it would become)``, or ``None``.

    Checked a chunk at a time, so that data which does not fit is refused after its first chunk.
    ``bf16`` rounds the float32 cast on to bfloat16 (the declared type is BF16).
    """
    flat = source.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start : start + _CHUNK]
        with np.errstate(all="ignore"):
            cast = part.astype(target)
        if bf16:
            cast = codec.bf16_bits_to_float32(codec.float32_to_bf16_bits(cast))
        lost = _lost(part, cast)
        if lost.any():
            index = int(np.argmax(lost))
            return part[index].item(), str(cast[index])
    return None


def conform(name: str, value: Any, datatype: str) -> Any:
    """Fit one input to the ``datatype`` its model declares, by the rule in this module's docstring.

    Args:
        name: the input's name (for error messages).
        value: what the caller passed: an ``np.ndarray``, a numpy scalar, a Python number, list or
            tuple, or a :class:`Tensor` (sent as the caller asked: returned unchanged).
        datatype: the v2 datatype the model declares for this input (``"FP32"``, ``"BYTES"``, ...).

    Returns:
        An ``np.ndarray`` of the declared datatype's dtype (the same object when nothing had to
        change), a ``Tensor(float32 array, "BF16")`` for BF16 inputs, or ``value`` unchanged when
        it is a Tensor, when ``datatype`` is not one this client knows, or when the value has no
        v2 datatype at all (the codec then raises its own error while encoding).

    Raises:
        InvalidInputError: the value would change (rule 4); the message says how to ask for the cast.
    """
    if type(value) is Tensor and value.datatype is not None:
        return value
    if type(value) is Tensor:
        value = value.data
    array = value if type(value) is np.ndarray else np.asarray(value)
    if datatype not in codec.NUMPY_DTYPES:
        return value
    try:
        own = datatype_for(array)
    except codec.CodecError:
        return value
    if own == datatype:
        return array
    if datatype == "BYTES" or own == "BYTES":
        if own == "BYTES":
            raise InvalidInputError(
                f"input {name!r}: the model declares {datatype}, got text ({own}); parse it into numbers first"
            )
        raise InvalidInputError(
            f"input {name!r}: the model declares BYTES, got {array.dtype} numbers; numbers are not turned into "
            "text implicitly: send value.astype(str) if text is what the model wants"
        )
    bf16 = datatype == "BF16"
    target = np.dtype(np.float32) if bf16 else codec.NUMPY_DTYPES[datatype]
    source = array.dtype
    same_family = _family(own) == _family(datatype)
    if same_family and not bf16 and np.can_cast(source, target, "safe"):
        return array.astype(target)
    if source in UNCHOSEN_DTYPES:
        lost = _first_lost(array, target, bf16)
        if lost is None:
            with np.errstate(all="ignore"):
                cast = array.astype(target)
            return Tensor(cast, "BF16") if bf16 else cast
        original, stored = lost
        raise InvalidInputError(
            f"input {name!r}: the model declares {datatype}, got {source} values it cannot hold unchanged "
            f"({original!r} would become {stored}); {_how_to_ask(datatype, source)}"
        )
    if same_family:
        reason = f"{source} -> {datatype} could change values"
    else:
        reason = f"{_family(own)} values for {_article(_family(datatype))} input are sent only when asked for"
    raise InvalidInputError(
        f"input {name!r}: the model declares {datatype}, got {_article(str(source))} array; {reason} "
        f"(only numpy's default float64 and int64 adapt by value); {_how_to_ask(datatype, source, 'it')}"
    )
