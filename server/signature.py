"""A model version's tensor signature, and validation of requests against it.

The signature is resolved once at load: from ``config.toml`` when it lists the
tensors (checked against what the model file declares), otherwise from the
model file. Requests are validated here, before batching, so that one bad
request can never fail the batch it would have joined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tensorwire.proto.codec import NUMPY_DTYPES
from tensorwire.repository import ModelConfigFile, TensorSpec
from tensorwire.server.backends.base import TensorInfo
from tensorwire.server.errors import InvalidRequestError, ModelLoadError

#: numpy refuses arrays whose byte size (counting zero-sized dimensions as 1) reaches 2**63.
_MAX_ARRAY_BYTES = 2**63 - 1


@dataclass(frozen=True)
class TensorSig:
    """One tensor as served: ``dims`` exclude the batch dimension; -1 = variable."""

    name: str
    datatype: str
    dims: tuple[int, ...]

    @property
    def fixed(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every fixed dimension, for the per-request shape check."""
        return self._fixed

    def __post_init__(self) -> None:
        object.__setattr__(self, "_fixed", tuple((a, d) for a, d in enumerate(self.dims) if d != -1))


@dataclass(frozen=True)
class PaddedInput:
    """An input whose ``axis`` (index into its dims, without the batch dimension) is padded with ``value``
    when requests of different lengths share a batch; ``mask``: the model input the server builds for it
    (``[batch, padded length]`` of ``mask_datatype``: 1 on the request's positions, 0 on padding), or None."""

    name: str
    axis: int
    value: int | float | bool
    mask: str | None = None
    mask_datatype: str | None = None


@dataclass(frozen=True)
class PaddedOutput:
    """An output whose ``axis`` (index into its dims) has the padded length of ``input``: each request
    gets it cut back to its own length of that input."""

    name: str
    axis: int
    input: str


@dataclass(frozen=True)
class PaddingPlan:
    """How a model's batches are padded: its padded inputs and outputs, and the largest share of the padded
    inputs' elements a batch may spend on padding (``dynamic_batching.max_padded_share``)."""

    inputs: tuple[PaddedInput, ...]
    outputs: tuple[PaddedOutput, ...]
    max_share: float


@dataclass(frozen=True)
class Signature:
    """The tensors as served (``dims`` without the batch dimension) and, for models that pad variable
    dimensions, the ``padding`` plan (None: requests share a batch only when their shapes agree)."""

    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    max_batch_size: int
    padding: PaddingPlan | None = None
    batched: bool = field(init=False)
    output_names: list[str] = field(init=False)

    def input(self, name: str) -> TensorSig | None:
        return self._inputs_by_name.get(name)

    def __post_init__(self) -> None:
        # Derived once; read on every request.
        object.__setattr__(self, "_inputs_by_name", {t.name: t for t in self.inputs})
        object.__setattr__(self, "batched", self.max_batch_size > 0)
        object.__setattr__(self, "output_names", [t.name for t in self.outputs])

    def served_shape(self, sig: TensorSig) -> list[int]:
        """The shape reported in metadata: the batch dimension (-1) first for batched models."""
        return ([-1] if self.batched else []) + list(sig.dims)


def _from_spec(spec: TensorSpec) -> TensorSig:
    return TensorSig(spec.name, spec.datatype, tuple(spec.dims))


def _from_model(info: TensorInfo, max_batch_size: int, what: str) -> TensorSig:
    """The served signature of a model-file tensor; refuses a leading dimension that cannot hold a batch.

    With ``max_batch_size > 0`` the model file's first dimension is the batch dimension: it must be
    variable (-1), or fixed at 1 when ``max_batch_size`` is 1 (ONNX Runtime would reject any other batch).
    """
    shape = info.shape
    if max_batch_size > 0:
        if not shape:
            raise ModelLoadError(f"{what} {info.name!r} has no dimensions, but max_batch_size > 0 needs a batch one")
        if shape[0] != -1 and not (shape[0] == 1 and max_batch_size == 1):
            raise ModelLoadError(
                f"{what} {info.name!r} has its first dimension fixed at {shape[0]} in the model file, so it "
                f"cannot be a batch dimension for max_batch_size {max_batch_size}; refused. Export the model "
                f"with a variable batch dimension, or set max_batch_size = 0 (whole tensors of shape "
                f"{list(shape)}){' or 1' if shape[0] == 1 else ''}"
            )
        shape = shape[1:]
    return TensorSig(info.name, info.datatype, tuple(shape))


def _all_from_model(infos: list[TensorInfo] | None, max_batch_size: int, what: str) -> list[TensorSig] | None:
    """``_from_model`` for every tensor; one ModelLoadError that names every tensor refused, not just the first."""
    if infos is None:
        return None
    sigs, refusals = [], []
    for info in infos:
        try:
            sigs.append(_from_model(info, max_batch_size, what))
        except ModelLoadError as err:
            refusals.append(str(err))
    if refusals:
        raise ModelLoadError("; ".join(refusals))
    return sigs


def _check(
    config_sigs: list[TensorSig], model_sigs: list[TensorSig] | None, what: str, built: frozenset[str] = frozenset()
) -> None:
    if model_sigs is None:
        return
    by_name = {t.name: t for t in model_sigs}
    for sig in config_sigs:
        found = by_name.get(sig.name)
        if found is None:
            raise ModelLoadError(f"config {what} {sig.name!r} is not in the model; the model has {sorted(by_name)}")
        if found.datatype != sig.datatype:
            raise ModelLoadError(f"config {what} {sig.name!r} says {sig.datatype}, the model says {found.datatype}")
        compatible = len(found.dims) == len(sig.dims) and all(
            m == -1 or c == m for c, m in zip(sig.dims, found.dims, strict=True)
        )
        if not compatible:
            raise ModelLoadError(
                f"config {what} {sig.name!r} has dims {list(sig.dims)}, the model has {list(found.dims)} "
                "(without the batch dimension)"
            )
    if what == "input":
        missing = set(by_name) - {s.name for s in config_sigs} - built
        if missing:
            raise ModelLoadError(f"the model also needs inputs {sorted(missing)}, which config.toml does not list")


def resolve_signature(
    config: ModelConfigFile, model_inputs: list[TensorInfo] | None, model_outputs: list[TensorInfo] | None
) -> Signature:
    """Combine the config's tensors with the model file's; raise ModelLoadError on conflict.

    ``model_inputs``/``model_outputs`` are what the model file declares (shapes with the batch dimension),
    None when the format cannot tell; the result's dims exclude the batch dimension."""
    mbs = config.max_batch_size
    from_model_in = _all_from_model(model_inputs, mbs, "input")
    from_model_out = _all_from_model(model_outputs, mbs, "output")
    masks = frozenset(s.padding.mask for s in config.inputs or [] if s.padding is not None and s.padding.mask)
    if config.inputs is not None:
        inputs = [_from_spec(s) for s in config.inputs]
        _check(inputs, from_model_in, "input", masks)
    elif from_model_in is not None:
        inputs = from_model_in
    else:
        raise ModelLoadError("this backend cannot read tensor names from the model file: list inputs in config.toml")
    if config.outputs is not None:
        outputs = [_from_spec(s) for s in config.outputs]
        _check(outputs, from_model_out, "output")
    elif from_model_out is not None:
        outputs = from_model_out
    else:
        raise ModelLoadError("this backend cannot read tensor names from the model file: list outputs in config.toml")
    padding = _padding_plan(config, outputs, from_model_in)
    return Signature(tuple(inputs), tuple(outputs), config.max_batch_size, padding)


def _padding_plan(
    config: ModelConfigFile, outputs: list[TensorSig], model_inputs: list[TensorSig] | None
) -> PaddingPlan | None:
    """The padding plan of a model whose config pads inputs (None when none is padded).

    Raises ModelLoadError when the model has no batch dimension, when an output has a variable dimension
    that the config does not tie to a padded input (its length in a padded batch would not be the
    request's), or when a mask input is not in the model file or the backend cannot tell its datatype."""
    padded = [(spec, spec.padded_axis) for spec in config.inputs or [] if spec.padding is not None]
    if not padded:
        return None
    if not config.max_batch_size:
        raise ModelLoadError("padded inputs need a batch dimension, but the model is served with max_batch_size 0")
    by_model = {t.name: t for t in model_inputs or []}
    plan_inputs = []
    for spec, axis in padded:
        mask, mask_datatype = spec.padding.mask, None
        if mask is not None:
            found = by_model.get(mask)
            if found is None:
                raise ModelLoadError(
                    f"input {spec.name!r}: padding.mask {mask!r} is not an input of the model file"
                    + ("" if model_inputs is not None else " (this backend cannot list the model's inputs)")
                )
            if found.datatype not in ("BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "FP16", "FP32", "FP64"):
                raise ModelLoadError(f"mask input {mask!r} is {found.datatype} in the model file; it must be numeric")
            if len(found.dims) != 1:
                raise ModelLoadError(
                    f"mask input {mask!r} has dims {list(found.dims)} (without the batch dimension); the server builds "
                    "[batch, length] masks"
                )
            mask_datatype = found.datatype
        plan_inputs.append(PaddedInput(spec.name, axis, spec.padding.pad_value, mask, mask_datatype))
    declared = {spec.name: spec for spec in config.outputs or [] if spec.padding is not None}
    plan_outputs = []
    for sig in outputs:
        spec = declared.get(sig.name)
        if spec is not None:
            plan_outputs.append(PaddedOutput(sig.name, spec.padded_axis, spec.padding.input))
        elif -1 in sig.dims:
            raise ModelLoadError(
                f"output {sig.name!r} has a variable dimension {list(sig.dims)}, and inputs of this model are padded: "
                'say which padded input\'s length it follows (list it in outputs with padding = {input = "..."}) so '
                "that each request gets its own length back"
            )
    return PaddingPlan(tuple(plan_inputs), tuple(plan_outputs), config.dynamic_batching.max_padded_share)


def check_input(signature: Signature, name: str, datatype: str, shape: tuple[int, ...]) -> TensorSig:
    """Check one input a request declares (before its bytes are decoded, so that the caller
    hears about a wrong shape rather than a consequent wrong byte count).

    ``shape`` is the request's, with the batch dimension for batched models. Raises InvalidRequestError
    for an unknown name, another datatype, another rank or fixed dimension, a negative dimension, a batch
    over max_batch_size, or a size numpy cannot hold (``[0, 2**63-1]``): every size the client controls is
    checked here, before numpy sees it."""
    sig = signature.input(name)
    if sig is None:
        raise InvalidRequestError(
            f"unknown input {name!r}; the model's inputs are {[t.name for t in signature.inputs]}"
        )
    if datatype != sig.datatype:
        raise InvalidRequestError(f"input {name!r} has datatype {datatype}, expected {sig.datatype}")
    offset = 1 if signature.batched else 0
    if len(shape) != len(sig.dims) + offset or any(shape[axis + offset] != dim for axis, dim in sig.fixed):
        raise InvalidRequestError(f"input {name!r} has shape {list(shape)}, expected {signature.served_shape(sig)}")
    if any(dim < 0 for dim in shape):
        raise InvalidRequestError(f"input {name!r} has shape {list(shape)}; dimensions cannot be negative")
    if offset and shape[0] > signature.max_batch_size:
        raise InvalidRequestError(
            f"batch of {shape[0]} exceeds the model's max_batch_size {signature.max_batch_size}; split the request"
        )
    itemsize = NUMPY_DTYPES[datatype].itemsize if datatype in NUMPY_DTYPES else 1
    if math.prod(max(dim, 1) for dim in shape) * itemsize > _MAX_ARRAY_BYTES:
        raise InvalidRequestError(f"input {name!r} has shape {list(shape)}, too large for any tensor")
    return sig


def check_rows(signature: Signature, rows_by_input: dict[str, int]) -> int:
    """The batch size (rows) the inputs agree on, within max_batch_size."""
    if not signature.batched:
        return 1
    sizes = set(rows_by_input.values())
    if len(sizes) != 1:
        raise InvalidRequestError(f"inputs disagree on the batch dimension (first dim): {rows_by_input}")
    rows = sizes.pop()
    if rows < 1:
        raise InvalidRequestError("the batch dimension (first dim) must be at least 1")
    if rows > signature.max_batch_size:
        raise InvalidRequestError(
            f"batch of {rows} exceeds the model's max_batch_size {signature.max_batch_size}; split the request"
        )
    return rows
