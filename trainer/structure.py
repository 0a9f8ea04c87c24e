"""The shape of a structurally pruned network, stored beside its weights and re-applied on load.

Structured pruning (``tensorwire prune``) removes whole channels, hidden units or heads, so a
pruned model no longer matches what its family builds from the stored name and options. Rather
than pickling the module (checkpoints stay ``torch.load(weights_only=True)``-readable), a run
records the *difference* from a freshly built model:

* ``attrs``: per module (dotted name), the public integer attributes that changed
  (``out_channels``, ``in_features``, ``num_features``, ``normalized_shape``, ...);
* ``shapes``: per parameter or buffer (dotted name), its new shape.

:func:`apply_structure` turns a fresh model into an empty model of the pruned shape, ready for
``load_state_dict``. Everything here is plain JSON (ints, lists, str), so the structure also
travels in ``fit_config.json`` to the DDP workers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Structure = dict[str, dict[str, Any]]

#: Attribute values worth recording: what layer constructors take as sizes.
_SIZE_TYPES = (int, tuple, list)


def _size_attrs(module: nn.Module) -> dict[str, Any]:
    """Public size-like attributes of one module (ints and tuples of ints, not flags)."""
    out: dict[str, Any] = {}
    for name, value in vars(module).items():
        if name.startswith("_") or name == "training" or isinstance(value, bool):
            continue
        if isinstance(value, int) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            out[name] = list(value) if isinstance(value, (tuple, list)) else value
    return out


def structure_diff(fresh: nn.Module, pruned: nn.Module) -> Structure:
    """What ``pruned`` changed relative to ``fresh`` (the same family and options, unpruned).

    Raises ValueError when the two do not have the same modules (pruning removes sizes, never layers).
    """
    fresh_modules = dict(fresh.named_modules())
    attrs: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        if name not in fresh_modules:
            raise ValueError(f"module {name!r} of the pruned model is not in the unpruned one")
        before, after = _size_attrs(fresh_modules[name]), _size_attrs(module)
        changed = {key: value for key, value in after.items() if before.get(key) != value}
        if changed:
            attrs[name] = changed
    fresh_state = fresh.state_dict()
    shapes = {
        name: list(tensor.shape)
        for name, tensor in pruned.state_dict().items()
        if name in fresh_state and tuple(fresh_state[name].shape) != tuple(tensor.shape)
    }
    return {"attrs": attrs, "shapes": shapes}


def apply_structure(model: nn.Module, structure: Structure | None) -> nn.Module:
    """Resize ``model`` (freshly built, unpruned) in place to the recorded structure; returns it.

    Parameters and buffers named in ``structure["shapes"]`` are replaced by uninitialized
    tensors of the new shape: load the pruned weights afterwards. Raises ValueError when a
    recorded module or tensor does not exist in ``model``.
    """
    if not structure:
        return model
    modules = dict(model.named_modules())
    for name, changed in structure.get("attrs", {}).items():
        if name not in modules:
            raise ValueError(f"pruned structure names module {name!r}, which this model does not have")
        module = modules[name]
        for key, value in changed.items():
            current = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(current, tuple) or isinstance(value, list) else value)
    for dotted, shape in structure.get("shapes", {}).items():
        owner_name, _, leaf = dotted.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            raise ValueError(f"pruned structure names tensor {dotted!r}, which this model does not have")
        if leaf in owner._parameters and owner._parameters[leaf] is not None:
            old = owner._parameters[leaf]
            owner._parameters[leaf] = nn.Parameter(
                torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )
        elif leaf in owner._buffers and owner._buffers[leaf] is not None:
            old = owner._buffers[leaf]
            owner._buffers[leaf] = torch.empty(shape, dtype=old.dtype, device=old.device)
        else:
            raise ValueError(f"pruned structure names tensor {dotted!r}, which this model does not have")
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameter values (what the compression table calls parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter values that are not exactly zero (what unstructured pruning reduces)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
