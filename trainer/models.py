"""Built-in model families and user factories.

Every model maps a batch of samples shaped ``(B, *sample_shape)`` to logits
``(B, num_classes)``. Models are rebuilt from a name and keyword arguments
(stored in the checkpoint), never unpickled, so checkpoints stay loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tensorwire.trainer.errors import TrainerError


class Standardize(nn.Module):
    """(x - mean) / std with per-feature statistics of the training split, baked into the model."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(*shape))
        self.register_buffer("std", torch.ones(*shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MLP(nn.Module):
    """Flatten, then Linear-ReLU-Dropout blocks: the Linear-heavy baseline."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(size)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCNN(nn.Module):
    """A small ResNet: a 3x3 stem, three stages (width, 2x, 4x; stride 2 after the first), pool, head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 32,
        blocks: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise TrainerError(
                f"model 'cnn' needs image samples shaped (C, H, W); got {list(input_shape)} "
                "(pass --input-shape C,H,W to reshape)"
            )
        channels = int(input_shape[0])
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages: list[nn.Module] = []
        cin = width
        for index, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stages.append(BasicBlock(cin, cout, 2 if index > 0 and block == 0 else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def _check_heads(d_model: int, heads: int) -> None:
    if d_model % heads:
        raise TrainerError(f"model 'transformer': d_model {d_model} must be divisible by heads {heads}")


def encoder_and_head(
    d_model: int, heads: int, layers: int, ff: int, dropout: float, num_classes: int
) -> tuple[nn.TransformerEncoder, nn.LayerNorm, nn.Linear]:
    """What both Transformer families put after their embedding: ``layers`` pre-norm encoder layers over
    (B, L, d_model) with ``heads`` heads and a feed-forward width ``ff``, then the final LayerNorm and the
    linear head to ``num_classes`` logits (the caller pools between the two). Created in this order, so a
    seed gives the same weights as before the families shared it."""
    layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    return encoder, nn.LayerNorm(d_model), nn.Linear(d_model, num_classes)


class TransformerClassifier(nn.Module):
    """Transformer encoder over tokens: (L, D) samples are L tokens; (C, H, W) images are H rows
    of C*W values; flat (F,) vectors are F one-value tokens. Mean-pooled, then a linear head."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        shape = list(input_shape)
        if len(shape) == 1:
            tokens, features = shape[0], 1
        elif len(shape) == 2:
            tokens, features = shape
        elif len(shape) == 3:
            tokens, features = shape[1], shape[0] * shape[2]
        else:
            raise TrainerError(f"model 'transformer' takes samples of 1 to 3 dimensions; got {shape}")
        _check_heads(d_model, heads)
        self.tokens, self.features = int(tokens), int(features)
        self.embed = nn.Linear(self.features, d_model)
        self.position = nn.Parameter(torch.zeros(1, self.tokens, d_model))
        nn.init.normal_(self.position, std=0.02)
        self.encoder, self.norm, self.head = encoder_and_head(d_model, heads, layers, ff, dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (B, C, H, W) -> (B, H, C*W)
            x = x.permute(0, 2, 1, 3).flatten(2)
        x = x.reshape(x.shape[0], self.tokens, self.features)
        h = self.encoder(self.embed(x) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


def sinusoidal_positions(length: int, width: int, device: torch.device) -> torch.Tensor:
    """Vaswani et al. (2017) position encodings, (length, width): sin on even, cos on odd features.

    Computed for any length at run time, so one exported model serves every sequence length."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    angles = position * rate[None, :]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)[:, :width]


class SequenceTransformer(nn.Module):
    """Transformer encoder over token ids: (B, L) int64 (0 = padding) -> (B, num_classes) logits.

    Padding is masked in attention and in the mean pooling, so a sequence's logits do not depend
    on how much padding follows it (a server may pad a batch to its longest request). The first
    position always counts, so an all-padding row yields finite logits rather than NaN.
    ``input_shape`` is (L,) of the training data; any length works at inference."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        vocab_size: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise TrainerError(f"token data must be shaped (length,) per sample; got {list(input_shape)}")
        _check_heads(d_model, heads)
        self.embed = nn.Embedding(int(vocab_size), d_model, padding_idx=0)
        self.encoder, self.norm, self.head = encoder_and_head(d_model, heads, layers, ff, dropout, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = torch.arange(x.shape[1], device=x.device)[None, :] == 0
        keep = (x != 0) | first  # (B, L) True where a real token (or position 0) is
        h = self.embed(x) * math.sqrt(self.embed.embedding_dim)
        h = h + sinusoidal_positions(x.shape[1], self.embed.embedding_dim, x.device)[None]
        h = self.encoder(h, src_key_padding_mask=~keep)
        weights = keep.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(dim=1) / weights.sum(dim=1)
        return self.head(self.norm(pooled))


def transformer(
    input_shape: Sequence[int],
    num_classes: int,
    vocab_size: int = 0,
    d_model: int = 64,
    heads: int = 4,
    layers: int = 2,
    ff: int = 128,
    dropout: float = 0.1,
) -> nn.Module:
    """The Transformer family: over token ids when the data has a vocabulary (``vocab_size`` > 0,
    filled in from the data), over float features otherwise."""
    common = {"d_model": d_model, "heads": heads, "layers": layers, "ff": ff, "dropout": dropout}
    if vocab_size:
        return SequenceTransformer(input_shape, num_classes, vocab_size, **common)
    return TransformerClassifier(input_shape, num_classes, **common)


BUILTIN: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": ResNetCNN,
    "transformer": transformer,
}


def model_kwargs(name: str, model_args: dict, vocab_size: int) -> dict:
    """The family's options plus what the data decides: ``vocab_size`` for token data.

    Raises TrainerError for token data with a family that takes float features."""
    kwargs = dict(model_args)
    if not vocab_size:
        return kwargs
    if name in ("mlp", "cnn"):
        raise TrainerError(
            f"model {name!r} takes float features, but the data is token ids; use --model transformer "
            "or a factory that takes vocab_size"
        )
    factory = BUILTIN.get(name)
    if factory is None:
        factory = _import_factory(name)
    params = inspect.signature(factory).parameters
    if "vocab_size" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs["vocab_size"] = vocab_size
    return kwargs


def example_input(sample_shape: Sequence[int], dtype: str = "float32", batch: int = 2) -> torch.Tensor:
    """A dummy batch: zeros for float features, token id 1 for token data (int64)."""
    if dtype == "int64":
        return torch.ones(batch, *sample_shape, dtype=torch.int64)
    return torch.zeros(batch, *sample_shape)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise TrainerError(f"unknown model {spec!r}: use one of {sorted(BUILTIN)} or 'package.module:factory'")
    if os.getcwd() not in sys.path:  # like `python -m`: a user's module next to their data is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise TrainerError(f"model {spec!r}: cannot import module {module_name!r} ({err})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TrainerError(f"model {spec!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    kwargs: dict | None = None,
    dropout: float | None = None,
    standardize: bool = False,
) -> nn.Module:
    """A fresh model; ``kwargs`` are the family's options (``--model-arg``), checked by name.

    ``dropout`` is passed only to factories that take it, so a user's factory
    need not accept options it has no use for.
    """
    factory = BUILTIN.get(name) or _import_factory(name)
    kwargs = dict(kwargs or {})
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if dropout is not None and "dropout" not in kwargs and ("dropout" in params or takes_any):
        kwargs["dropout"] = dropout
    unknown = [k for k in kwargs if k not in params and not takes_any]
    if unknown:
        allowed = [k for k in params if k not in ("input_shape", "num_classes")]
        raise TrainerError(f"model {name!r} takes no argument {unknown[0]!r} (it takes: {', '.join(allowed)})")
    try:
        model = factory(input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes), **kwargs)
    except TrainerError:
        raise
    except (TypeError, ValueError) as err:
        raise TrainerError(f"model {name!r} could not be built: {err}") from None
    if not isinstance(model, nn.Module):
        raise TrainerError(f"model {name!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if standardize:
        model = nn.Sequential(Standardize(input_shape), model)
    return model


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """A fresh model (new weights) as a checkpoint's ``model_spec`` describes it: family ``name``,
    ``input_shape`` (one sample, without the batch dimension), ``num_classes``, the family's ``kwargs``,
    ``dropout`` and ``standardize``. A pruned model's ``structure`` is not applied here
    (``tensorwire.trainer.structure.apply_structure``). Raises TrainerError as ``build_model`` does."""
    return build_model(
        spec["name"],
        spec["input_shape"],
        spec["num_classes"],
        spec["kwargs"],
        dropout=spec["dropout"],
        standardize=spec["standardize"],
    )


def check_model(
    model: nn.Module, sample_shape: Sequence[int], num_classes: int, name: str, dtype: str = "float32"
) -> None:
    """Run two dummy samples through the model so shape mistakes fail before training starts."""
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input(sample_shape, dtype))
    except Exception as err:  # noqa: BLE001 - any failure here is a model/data mismatch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainerError(f"model {name!r} cannot take samples shaped {list(sample_shape)}: {first}") from None
    if tuple(out.shape) != (2, num_classes):
        raise TrainerError(
            f"model {name!r} returned shape {list(out.shape[1:])} per sample; expected [{num_classes}] logits"
        )
