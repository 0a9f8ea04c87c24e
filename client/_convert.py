"""numpy <-> protobuf for the client, through the shared codec in :mod:`tensorwire.proto.codec`.

The hot path (one request in, one response out) does a constant amount of
Python work per *tensor*, never per element: fixed-size tensors are one
``tobytes`` copy out and a zero-copy ``np.frombuffer`` view in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from tensorwire.client.errors import InvalidInputError, make_error
from tensorwire.client.results import InferResult, Tensor
from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb

#: Inputs: name -> array (or anything np.asarray takes) or a Tensor with an explicit datatype.
Inputs = Mapping[str, Any]
ParamValue = bool | int | float | str
#: Repository load/unload parameters: name -> bool, int, str or bytes.
RepositoryParams = Mapping[str, bool | int | str | bytes]
#: Requested outputs: names, or name -> per-output parameters.
Outputs = Sequence[str] | Mapping[str, Mapping[str, ParamValue]]

_UINT64_MAX = 2**64 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: numpy dtype -> v2 datatype, filled lazily from the codec's own ``datatype_of``.
_DATATYPE_OF: dict[np.dtype, str] = {}


def version_string(version: int | str | None) -> str:
    """Model versions travel as strings; empty means "the server's choice"."""
    return "" if version is None else str(version)


def param(value: ParamValue) -> pb.InferParameter:
    """A Python value as an ``InferParameter`` (ints past int64 go as uint64)."""
    if isinstance(value, bool | np.bool_):
        return pb.InferParameter(bool_param=bool(value))
    if isinstance(value, int | np.integer):
        value = int(value)
        if _INT64_MIN <= value <= _INT64_MAX:
            return pb.InferParameter(int64_param=value)
        if 0 <= value <= _UINT64_MAX:
            return pb.InferParameter(uint64_param=value)
        raise InvalidInputError(f"parameter value {value} does not fit int64 or uint64")
    if isinstance(value, float | np.floating):
        return pb.InferParameter(double_param=float(value))
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise InvalidInputError(f"parameter values must be bool, int, float or str, not {type(value).__name__}")


def param_value(parameter: pb.InferParameter) -> ParamValue:
    """The Python value of an ``InferParameter`` (whichever of its five choices is set)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice else None  # type: ignore[return-value]


def repository_param(value: bool | int | str | bytes) -> pb.ModelRepositoryParameter:
    """A Python value as a ``ModelRepositoryParameter`` (repository load/unload)."""
    if isinstance(value, bool):
        return pb.ModelRepositoryParameter(bool_param=value)
    if isinstance(value, int):
        return pb.ModelRepositoryParameter(int64_param=value)
    if isinstance(value, str):
        return pb.ModelRepositoryParameter(string_param=value)
    if isinstance(value, bytes | bytearray):
        return pb.ModelRepositoryParameter(bytes_param=bytes(value))
    raise InvalidInputError(f"repository parameters must be bool, int, str or bytes, not {type(value).__name__}")


def datatype_for(array: np.ndarray) -> str:
    """``codec.datatype_of(array)``, remembered per dtype (the hot path asks once per input per call).

    Raises codec.CodecError for a dtype without a v2 datatype.
    """
    datatype = _DATATYPE_OF.get(array.dtype)
    if datatype is None:
        datatype = codec.datatype_of(array)
        if array.dtype.kind not in "OSUV":  # flexible dtypes vary by width: don't cache
            _DATATYPE_OF[array.dtype] = datatype
    return datatype


def encode(name: str, value: Any) -> tuple[str, list[int], bytes]:
    """One input as ``(datatype, shape, raw bytes)`` via the codec.

    ``value`` is an array of the input's full shape (or anything ``np.asarray`` takes), or a
    :class:`Tensor` naming its datatype. No casting rule here: the datatype is the value's own
    or the Tensor's (the client core fits values to the model's datatypes before this).

    Raises:
        InvalidInputError: the value has no v2 datatype, or the Tensor's datatype cannot hold it.
    """
    datatype: str | None = None
    if type(value) is Tensor:
        value, datatype = value.data, value.datatype
    try:
        if datatype is None:
            if type(value) is not np.ndarray:
                value = np.asarray(value)
            datatype = datatype_for(value)
        return codec.encode_raw(value, datatype)
    except (codec.CodecError, ValueError, TypeError, OverflowError) as error:
        raise InvalidInputError(f"input {name!r}: {error}") from None


def build_request(
    model: str,
    inputs: Inputs,
    *,
    outputs: Outputs | None = None,
    version: int | str | None = None,
    priority: int | None = None,
    request_id: str | None = None,
    parameters: Mapping[str, ParamValue] | None = None,
) -> pb.ModelInferRequest:
    """A ``ModelInferRequest`` with every tensor in ``raw_input_contents`` (arguments as in ``infer``).

    ``inputs`` maps names to values already fitted to the model (see :func:`encode`).

    Raises:
        InvalidInputError: no model name, an input that cannot be encoded, a parameter value
            that is not bool/int/float/str (or an int past uint64), a negative priority.
    """
    if not isinstance(model, str) or not model:
        raise InvalidInputError("a model name is required")
    request = pb.ModelInferRequest(model_name=model)
    if version is not None:
        request.model_version = str(version)
    if request_id:
        request.id = request_id
    tensors = request.inputs
    raws = request.raw_input_contents
    for name, value in inputs.items():
        datatype, shape, raw = encode(name, value)
        tensors.add(name=name, datatype=datatype, shape=shape)
        raws.append(raw)
    if outputs is not None:
        if isinstance(outputs, str):
            outputs = [outputs]
        if isinstance(outputs, Mapping):
            for name, output_params in outputs.items():
                requested = request.outputs.add(name=name)
                for key, value in (output_params or {}).items():
                    requested.parameters[key].CopyFrom(param(value))
        else:
            for name in outputs:
                request.outputs.add(name=name)
    if parameters:
        for key, value in parameters.items():
            request.parameters[key].CopyFrom(param(value))
    if priority is not None:
        if priority < 0:
            raise InvalidInputError("priority must be >= 0 (1 is the highest level; 0 the model's default)")
        request.parameters["priority"].CopyFrom(pb.InferParameter(uint64_param=int(priority)))
    return request


def parse_response(response: pb.ModelInferResponse, bf16_as: str = "float32") -> InferResult:
    """An ``InferResult`` from a response: raw contents zero-copy, typed contents as a fallback.

    ``bf16_as`` as in the client's constructor. Raises InternalServerError when the response
    breaks the protocol (byte counts that do not match shapes, unknown datatypes).
    """
    arrays: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    raws = response.raw_output_contents
    count = len(raws)
    try:
        for index, output in enumerate(response.outputs):
            name, datatype = output.name, output.datatype
            if index < count:
                arrays[name] = codec.decode_raw(raws[index], datatype, output.shape, bf16_as=bf16_as)
            else:
                arrays[name] = codec.decode_contents(output.contents, datatype, output.shape)
            datatypes[name] = datatype
    except codec.CodecError as error:
        # The server sent something the protocol does not allow: a server-side problem.
        message = f"malformed response from model {response.model_name!r}: {error}"
        raise make_error(grpc.StatusCode.INTERNAL, message) from None
    return InferResult(arrays, datatypes, response)
