"""Building ModelInferRequests for tests with the shared codec."""

from __future__ import annotations

import numpy as np

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import decode_raw, encode_raw

InputTensor = pb.ModelInferRequest.InferInputTensor


def infer_request(
    model: str,
    inputs: dict[str, np.ndarray],
    *,
    version: str = "",
    request_id: str = "",
    outputs: list[str] | None = None,
    parameters: dict | None = None,
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype, shape, raw = encode_raw(array)
        request.inputs.append(InputTensor(name=name, datatype=datatype, shape=shape))
        request.raw_input_contents.append(raw)
    for name in outputs or []:
        request.outputs.add(name=name)
    for key, value in (parameters or {}).items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = value
    return request


def sleeper_request(ident: int, sleep_ms: float = 0.0, **kwargs) -> pb.ModelInferRequest:
    return infer_request(
        "sleeper",
        {"ID": np.array([[ident]], np.int64), "SLEEP_MS": np.array([[sleep_ms]], np.float32)},
        request_id=str(ident),
        **kwargs,
    )


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        tensor.name: decode_raw(raw, tensor.datatype, list(tensor.shape))
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
