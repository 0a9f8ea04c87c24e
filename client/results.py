"""What the SDK hands back and takes in besides plain numpy arrays."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from tensorwire.proto import inference_pb2 as pb


class Tensor(NamedTuple):
    """An input with an explicit v2 datatype: the caller asks for this datatype, casting included.

    ``data`` is an array (or anything ``np.asarray`` takes) of the input's full shape, batch
    dimension included when the model batches. ``Tensor(x, "FP32")`` sends float64 ``x``
    rounded to float32, which the casting rule would refuse implicitly when a value changes;
    ``Tensor(x, "BF16")`` rounds to bfloat16 (numpy has no bfloat16); ``Tensor(words,
    "BYTES")`` makes the intent explicit for ``str`` data. Integers must still fit the
    datatype and floats are never cast to integers (``InvalidInputError`` before sending).
    Plain arrays need no wrapper: their datatype follows the model's declaration by the
    casting rule (README, "Sending inputs"). ``datatype=None`` is the same as a plain value.
    """

    data: Any
    datatype: str | None = None


def bf16(array: Any) -> Tensor:
    """Mark a float array (any shape) to be sent as BF16, rounded to nearest even: ``Tensor(array, "BF16")``."""
    return Tensor(array, "BF16")


class InferResult(Mapping[str, np.ndarray]):
    """The outputs of one inference: a mapping of output name to ``np.ndarray``.

    Each array has the shape the server answered with (batch dimension included for
    batching models). Arrays of fixed-size datatypes are zero-copy, read-only views of the
    response (``np.array(result[name])`` for a writable copy); BYTES outputs are object
    arrays of ``bytes``; BF16 outputs follow the client's ``bf16_as``. ``model_name``,
    ``model_version`` and ``id`` echo the server (a stream request sent without
    ``request_id`` has a generated ``tw-...`` id), ``parameters`` are the response
    parameters as Python values, ``datatypes`` the v2 datatype of each output, and
    ``response`` is the raw protobuf message. ``result[name]`` raises KeyError, listing
    the outputs there are, for a name that is not among them.
    """

    __slots__ = ("_outputs", "datatypes", "model_name", "model_version", "id", "response")

    def __init__(
        self,
        outputs: dict[str, np.ndarray],
        datatypes: dict[str, str],
        response: pb.ModelInferResponse,
    ) -> None:
        self._outputs = outputs
        self.datatypes = datatypes
        self.model_name: str = response.model_name
        self.model_version: str = response.model_version
        self.id: str = response.id
        self.response = response

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._outputs[name]
        except KeyError:
            raise KeyError(
                f"no output {name!r} in the result of {self.model_name!r}; outputs: {sorted(self._outputs)}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._outputs)

    def __len__(self) -> int:
        return len(self._outputs)

    @property
    def parameters(self) -> dict[str, bool | int | str | float]:
        """Response-level parameters as Python values."""
        from tensorwire.client._convert import param_value

        return {key: param_value(value) for key, value in self.response.parameters.items()}

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}: {self.datatypes[name]}{list(array.shape)}" for name, array in self._outputs.items()
        )
        version = f" v{self.model_version}" if self.model_version else ""
        return f"InferResult({self.model_name}{version}; {shapes})"
