"""Request inputs for load generators, built from what the server (or the model file) says about a model.

The locustfile, ``tensorwire bench``, the SDK benchmark and the in-process ceiling send the same kind of
input: every input of the model, ``batch_size`` rows when the model takes a batch dimension, variable
dimensions as 1 (or a shape given on the command line), seeded finite values (standard normal clipped
to [-3, 3] for floats: random bytes would overflow a CNN to inf/NaN), zeros for integers, ``b"x"`` for
BYTES.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tensorwire.proto import codec
from tensorwire.repository.onnx_types import ONNX_DATATYPES


@dataclass(frozen=True)
class InputSpec:
    """What one request carries for one input."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # the full shape sent, batch dimension included when batched
    batched: bool = False  # whether shape[0] is the batch dimension


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` or ``"3x32x32"`` -> (3, 32, 32); empty or None -> None."""
    if not text:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"input shape {text!r} is not a comma-separated list of integers") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"input shape {text!r} needs positive sizes")
    return shape


def input_specs(
    metadata,
    max_batch_size: int | None,
    batch_size: int = 1,
    shape: Sequence[int] | None = None,
    datatype: str | None = None,
) -> list[InputSpec]:
    """Input specs from a ``ModelMetadataResponse`` (and ``max_batch_size`` from ModelConfig).

    ``max_batch_size`` None means "unknown" (a server without ModelConfig): then a leading
    -1 in the metadata shape is taken to be the batch dimension. ``shape`` and ``datatype``
    override the per-sample shape (without the batch dimension) and datatype of every input.
    """
    if batch_size < 1:
        raise ValueError("batch size must be >= 1")
    specs = []
    for tensor in metadata.inputs:
        dims = list(tensor.shape)
        batched = max_batch_size > 0 if max_batch_size is not None else bool(dims) and dims[0] == -1
        if batched and dims:
            dims = dims[1:]
        if max_batch_size and batch_size > max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the model's max_batch_size {max_batch_size}")
        sample = tuple(shape) if shape is not None else tuple(d if d > 0 else 1 for d in dims)
        if not batched and batch_size != 1:
            raise ValueError(f"model {metadata.name!r} takes no batch dimension; use batch size 1")
        full = ((batch_size,) if batched else ()) + sample
        specs.append(InputSpec(tensor.name, datatype or tensor.datatype, full, batched))
    if not specs:
        raise ValueError(f"model {metadata.name!r} lists no inputs")
    return specs


def session_specs(session, batch_size: int) -> list[InputSpec]:
    """Input specs from an ONNX Runtime session: the first dimension is the batch (``batch_size`` rows),
    other variable dimensions 1. Raises ValueError for a type outside :data:`ONNX_DATATYPES`."""
    specs = []
    for meta in session.get_inputs():
        if meta.type not in ONNX_DATATYPES:
            raise ValueError(f"input {meta.name!r} has ONNX type {meta.type}, which load generators do not send")
        dims = list(meta.shape)
        shape = tuple([batch_size] + [d if isinstance(d, int) and d > 0 else 1 for d in dims[1:]]) if dims else ()
        specs.append(InputSpec(meta.name, ONNX_DATATYPES[meta.type], shape, batched=bool(dims)))
    return specs


def make_arrays(specs: Sequence[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded arrays for the specs (see the module docstring)."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.datatype == "BYTES":
            arrays[spec.name] = np.full(spec.shape, b"x", dtype=object)
            continue
        if spec.datatype == "BF16":
            raise ValueError(f"input {spec.name!r} is BF16; load generators send FP16/FP32/ints only")
        dtype = np.dtype(codec.NUMPY_DTYPES[spec.datatype])
        if dtype.kind == "f":
            values = np.clip(rng.standard_normal(spec.shape), -3, 3).astype(dtype)
        else:
            values = np.zeros(spec.shape, dtype)
        arrays[spec.name] = values
    return arrays


def request_inputs(
    client,
    model: str,
    batch_size: int = 1,
    shape: Sequence[int] | None = None,
    datatype: str | None = None,
    seed: int = 0,
    version: str | None = None,
) -> tuple[dict[str, np.ndarray], list[InputSpec], int | None]:
    """Ask a (blocking) client for the model's metadata and config; build one request's inputs.

    Returns (inputs, specs, max_batch_size or None when the server has no ModelConfig).
    """
    metadata = client.model_metadata(model, version)
    try:
        max_batch_size: int | None = client.model_config(model, version).max_batch_size
    except Exception:  # a v2 server without the ModelConfig extension
        max_batch_size = None
    specs = input_specs(metadata, max_batch_size, batch_size, shape, datatype)
    return make_arrays(specs, seed), specs, max_batch_size


def rows_per_request(specs: Sequence[InputSpec]) -> int:
    """Samples one request carries (the batch dimension, or 1 for an unbatched model)."""
    return specs[0].shape[0] if specs[0].batched else 1
