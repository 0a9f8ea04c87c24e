"""The v2 REST protocol's JSON bodies <-> the data plane's neutral requests and answers.

Inference requests are JSON (``{"id", "parameters", "inputs": [{"name", "datatype", "shape", "data",
"parameters"}], "outputs": [{"name", "parameters"}]}``) or, with Triton's binary-tensor extension, a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the tensors' raw bytes: an input whose
parameters give ``binary_data_size`` takes that many bytes, in input order, and carries no ``data``.
Answers carry each output as JSON ``data`` or, when asked (output parameter ``binary_data``, or the request
parameter ``binary_data_output`` for every output without its own), as raw bytes after the JSON header, with
``binary_data_size`` in the output's parameters. Raw bytes are the gRPC protocol's raw contents
(little-endian, row-major, BYTES length-prefixed), decoded by the same codec without a copy.

Configuration and statistics messages are written as Triton's HTTP endpoint writes them: protobuf field
names, enums by name, 64-bit integers as JSON numbers (protobuf's own JSON mapping writes them as strings,
which perf_analyzer's reader refuses).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tensorwire.proto.codec import CodecError, decode_raw
from tensorwire.proto.json_codec import decode_json, encode_json
from tensorwire.server.dataplane import InferRequest, InputTensor
from tensorwire.server.engine import ServedVersion
from tensorwire.server.errors import InvalidRequestError
from tensorwire.server.replicas import EncodedTensor

#: The header that splits a body into its JSON part and the binary tensors after it (Triton's extension).
HEADER_LENGTH = "Inference-Header-Content-Length"


class MalformedRequest(ValueError):
    """The body is not a v2 REST request of the endpoint's kind (bad JSON, or a field of the wrong type)."""


def _no_data(data: Any, datatype: str, shape: tuple[int, ...]) -> Any:
    raise CodecError("no data: give 'data' (JSON) or parameters.binary_data_size (binary, after the JSON header)")


def _both_forms(data: Any, datatype: str, shape: tuple[int, ...]) -> Any:
    raise CodecError("has both 'data' and parameters.binary_data_size; send one")


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise MalformedRequest(f"{what} must be a JSON object")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedRequest(f"{what} must be a string")
    return value


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise MalformedRequest(f"{what} must be a list of integers")
    return tuple(value)


def parse_json(body: bytes | bytearray | memoryview, what: str = "the body") -> Any:
    """The JSON value of ``body``; MalformedRequest when it is not JSON (UTF-8)."""
    try:
        return json.loads(bytes(body) if isinstance(body, memoryview) else body)
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedRequest(f"{what} is not valid JSON: {err}") from None


def parse_infer_request(
    body: bytes | bytearray, header_length: int | None, model_name: str, model_version: str
) -> tuple[InferRequest, dict[str, bool], bool]:
    """A v2 REST inference body as the data plane's neutral request.

    ``header_length``: the ``Inference-Header-Content-Length`` header (None: the whole body is JSON).
    Returns ``(request, binary_outputs, binary_default)``: the per-output ``binary_data`` choices and the
    request's ``binary_data_output``. Raises MalformedRequest for a body that is not such a request (no
    model is involved yet); problems with the binary part's sizes become the request's ``wire_error``
    (raised once the model resolved, counted like any invalid request).
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    elif not 0 <= header_length <= len(view):
        raise MalformedRequest(
            f"{HEADER_LENGTH} is {header_length} but the body has {len(view)} bytes; it must give the JSON "
            "header's length in bytes"
        )
    header = _object(parse_json(view[:header_length], "the request's JSON header"), "the request")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise MalformedRequest("'id' must be a string")
    parameters = _object(header.get("parameters", {}), "'parameters'")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise MalformedRequest("'inputs' must be a list of tensors ({'name', 'datatype', 'shape', 'data'})")
    inputs: list[InputTensor] = []
    offset, binary_end, wire_error = header_length, len(view), None
    for index, entry in enumerate(raw_inputs):
        entry = _object(entry, f"inputs[{index}]")
        name = _string(entry.get("name"), f"inputs[{index}].name")
        datatype = _string(entry.get("datatype"), f"input {name!r}: 'datatype'")
        shape = _shape(entry.get("shape"), f"input {name!r}: 'shape'")
        tensor_parameters = _object(entry.get("parameters", {}), f"input {name!r}: 'parameters'")
        size = tensor_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise MalformedRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
            if offset + size > binary_end:
                wire_error = wire_error or InvalidRequestError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({binary_end - offset} bytes of binary data left)"
                )
                data, decode = None, _no_data
            elif "data" in entry:
                data, decode = None, _both_forms
            else:
                data, decode = view[offset : offset + size], decode_raw
            offset += size
        elif "data" in entry:
            data, decode = entry["data"], decode_json
        else:
            data, decode = None, _no_data
        inputs.append(InputTensor(name, datatype, shape, data, decode, tensor_parameters or None))
    if wire_error is None and offset != binary_end:
        wire_error = InvalidRequestError(
            f"the body has {binary_end - header_length} bytes after the JSON header but the inputs' "
            f"binary_data_size add up to {offset - header_length}"
        )
    outputs: list[str] | None = None
    binary_outputs: dict[str, bool] = {}
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise MalformedRequest("'outputs' must be a list of {'name', 'parameters'}")
        outputs = []
        for index, entry in enumerate(raw_outputs):
            entry = _object(entry, f"outputs[{index}]")
            name = _string(entry.get("name"), f"outputs[{index}].name")
            output_parameters = _object(entry.get("parameters", {}), f"output {name!r}: 'parameters'")
            if output_parameters.get("classification"):
                wire_error = wire_error or InvalidRequestError(
                    f"output {name!r}: the classification extension is not supported; request the tensor "
                    "and take its top classes on the client"
                )
            if "binary_data" in output_parameters:
                binary_outputs[name] = bool(output_parameters["binary_data"])
            outputs.append(name)
    binary_default = bool(parameters.get("binary_data_output", False))
    request = InferRequest(
        model_name, model_version, request_id, inputs, outputs or None, parameters or None, wire_error
    )
    return request, binary_outputs, binary_default


def encode_infer_response(
    version: ServedVersion,
    request_id: str,
    outputs: Sequence[EncodedTensor],
    binary_outputs: dict[str, bool],
    binary_default: bool,
) -> tuple[bytes, int | None]:
    """The answer's body and, when some outputs travel in binary, the JSON header's length (the value of
    ``Inference-Header-Content-Length``; None: the body is JSON only).

    Raises InvalidRequestError for a BYTES output that is not UTF-8 and was asked for as JSON.
    """
    tensors = []
    binary: list[bytes] = []
    for name, datatype, shape, raw in outputs:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if binary_outputs.get(name, binary_default):
            tensor["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            try:
                tensor["data"] = encode_json(raw, datatype, shape)
            except CodecError as err:
                raise InvalidRequestError(f"output {name!r}: {err}") from None
        tensors.append(tensor)
    answer: dict[str, Any] = {"model_name": version.name, "model_version": str(version.version)}
    if request_id:
        answer["id"] = request_id
    answer["outputs"] = tensors
    header = json.dumps(answer, separators=(",", ":")).encode()
    if not binary:
        return header, None
    return b"".join([header, *binary]), len(header)


# ------------------------------------------------------------ protobuf messages


_INT64_TYPES = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return message_to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type.values_by_number.get(value)
        return enum.name if enum is not None else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("latin-1")
    return value


def message_to_json(message: Message) -> dict[str, Any]:
    """``message`` as Triton's HTTP endpoint writes it: every scalar and repeated field (defaults included),
    sub-messages only when set, maps as objects, field names as in the .proto, enums by name, 64-bit
    integers as numbers."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _value(value_field, v) for k, v in value.items()}
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            out[field.name] = [_value(field, v) for v in value]
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if message.HasField(field.name):
                out[field.name] = message_to_json(value)
        elif field.containing_oneof is not None and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _value(field, value)
    return out
