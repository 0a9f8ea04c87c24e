"""Completing ``max_batch_size`` from the model file, as Triton's auto-complete does.

When a configuration does not give ``max_batch_size`` (or there is no configuration at all), the
server reads the model file's tensor shapes at load and calls :func:`complete_max_batch_size`: a model
whose every input and output has a variable leading dimension is served batched, with
:data:`DEFAULT_MAX_BATCH_SIZE` and the dynamic batcher on; any other model is served without a batch
dimension (``max_batch_size = 0``), and the reason says which tensor decided it. An explicit
``max_batch_size`` (0 included) is never changed.

The rule is Triton's (its model-configuration guide: a model can batch when "all inputs and outputs
to the model have this batch dimension" first, and backends that auto-complete turn the dynamic batcher
on for such models). This module imports no model runtime: shapes come in as plain tuples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tensorwire.repository.config import ModelConfigFile

#: max_batch_size given to a model that can batch but whose configuration does not say how much.
#: Triton's default is 4 (``--backend-config=default-max-batch-size``). tensorwire uses 16: its
#: batcher is work-conserving (a batch forms only while every replica is busy), so a larger cap adds no
#: latency at low load and amortises per-call overhead at high load; warm-up covers every size up to it.
DEFAULT_MAX_BATCH_SIZE = 16


class ModelTensor(Protocol):
    """A tensor as the model file declares it: ``shape`` with any batch dimension, -1 = variable."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BatchDecision:
    """The completed ``max_batch_size`` and, for the load log, why."""

    max_batch_size: int
    reason: str

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


def complete_max_batch_size(
    config: ModelConfigFile,
    model_inputs: Sequence[ModelTensor] | None,
    model_outputs: Sequence[ModelTensor] | None,
) -> BatchDecision:
    """Decide ``max_batch_size`` for a configuration that leaves it out.

    ``model_inputs``/``model_outputs``: the model file's tensors (full shapes, -1 = variable), or None
    when the format cannot tell (TorchScript, Python). The result is ``DEFAULT_MAX_BATCH_SIZE`` (or the
    largest preferred batch size, if larger) when every tensor has a variable leading dimension and any
    tensors the config lists have one dimension fewer than the model's (their dims exclude a batch
    dimension); otherwise 0. Raises ValueError when ``config.max_batch_size`` is already given.
    """
    if config.max_batch_size is not None:
        raise ValueError("max_batch_size is given; nothing to complete")
    if model_inputs is None or model_outputs is None:
        return BatchDecision(
            0,
            f"the {config.backend} model file does not declare tensor shapes; set max_batch_size to serve it batched",
        )
    blockers: list[str] = []
    for what, tensors in (("input", model_inputs), ("output", model_outputs)):
        for tensor in tensors:
            shape = tuple(tensor.shape)
            if not shape:
                blockers.append(f"{what} {tensor.name!r} has no dimensions")
            elif shape[0] != -1:
                blockers.append(f"{what} {tensor.name!r} has a fixed leading dimension {shape[0]}")
            spec = config.tensor_spec(tensor.name)
            if spec is not None and len(spec.model_dims) != len(shape) - 1:
                blockers.append(
                    f"the config gives {what} {tensor.name!r} {len(spec.model_dims)} dims for a model tensor of "
                    f"rank {len(shape)} (a batched model's dims leave the batch dimension out)"
                )
    if blockers:
        return BatchDecision(0, "no batch dimension: " + "; ".join(blockers))
    size = max([DEFAULT_MAX_BATCH_SIZE, *config.dynamic_batching.preferred_batch_sizes])
    return BatchDecision(size, "every input and output has a variable leading dimension")


def completed(config: ModelConfigFile, decision: BatchDecision) -> ModelConfigFile:
    """``config`` with the decided ``max_batch_size`` filled in (the dynamic batcher keeps its setting,
    which is on unless the configuration turned it off)."""
    return config.model_copy(update={"max_batch_size": decision.max_batch_size})
