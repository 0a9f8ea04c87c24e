"""Triton's ``config.pbtxt`` read into tensorwire's model configuration.

A Triton model repository (``<model>/config.pbtxt`` beside ``<model>/<version>/model.onnx``) is served
unchanged. The file is protobuf text format of Triton's ``ModelConfig``; it is parsed with protobuf's own
text-format parser against the subset of ``ModelConfig`` that ``proto/inference.proto`` declares (Triton's
field names and numbers), then mapped to :class:`~tensorwire.repository.config.ModelConfigFile` and
validated like a ``config.toml``. Before that, one walk over protobuf's tokenizer sets aside the fields the
subset does not declare (protobuf's own skipping of unknown fields cannot read Triton's ``name [ {...} ]``
lists inside them) and records where each field is, so nothing goes unreported.

Every setting is accounted for:

* honoured: ``name`` (must match the folder, as in Triton), ``platform``/``backend`` (``onnxruntime_onnx``,
  ``pytorch_libtorch``), ``max_batch_size``, ``input``/``output`` (``data_type``, ``dims``, ``reshape``),
  ``dynamic_batching`` (``max_queue_delay_microseconds``, ``preferred_batch_size``, ``priority_levels``,
  ``default_priority_level``, ``default_queue_policy``'s timeout and queue size), ``instance_group``
  (``kind``, ``count``, ``gpus``), ``version_policy``, ``default_model_filename``, ``parameters``
  (kept as metadata strings);
* needed by the model but impossible here (sequence batching, ensembles, ragged batching, shape tensors,
  decoupled models, another platform such as TensorRT): :class:`RepositoryConfigError` with the reason, so
  the model shows UNAVAILABLE with it;
* anything else (``optimization``, ``model_warmup``, ``response_cache``, ``label_filename``, ...): listed in
  :attr:`TritonConfig.ignored`, which the server logs as a warning. Nothing is dropped silently.

Where Triton's defaults differ from a field's protobuf zero, Triton's documented meaning is used: no
``max_batch_size`` means "complete it from the model" (auto-complete), ``count`` 0 means one instance,
``priority_levels`` 0 means no priorities, a ``max_batch_size`` above 1 without a scheduler turns the
dynamic batcher on with its default settings (no queue delay).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory, text_format

from tensorwire.proto import inference_pb2 as pb
from tensorwire.repository.backends import BACKENDS
from tensorwire.repository.config import ModelConfigFile, RepositoryConfigError, parse_model_config

TRITON_CONFIG_FILE = "config.pbtxt"

#: Settings whose presence means the model needs a feature tensorwire does not have.
_NEEDS: dict[str, str] = {
    "sequence_batching": "sequence batching (a stateful model whose requests are routed by correlation ID)",
    "ensemble_scheduling": "ensemble scheduling (a pipeline of other models)",
    "batch_input": "batch inputs built by the server (ragged batching)",
    "batch_output": "batch outputs (ragged batching)",
}
#: Boolean settings that, when true, mean the same.
_NEEDS_WHEN_TRUE: dict[str, str] = {
    "input.allow_ragged_batch": "ragged batching",
    "input.is_shape_tensor": "shape tensors",
    "output.is_shape_tensor": "shape tensors",
    "input.is_non_linear_format_io": "non-linear I/O formats (TensorRT)",
    "output.is_non_linear_format_io": "non-linear I/O formats (TensorRT)",
}
#: Triton platform/backend names we recognise but cannot serve, with what they are.
_FOREIGN_PLATFORMS: dict[str, str] = {
    "ensemble": "an ensemble (a pipeline of other models)",
    "tensorrt_plan": "a TensorRT plan",
    "tensorrt": "a TensorRT plan",
    "tensorflow_graphdef": "a TensorFlow GraphDef",
    "tensorflow_savedmodel": "a TensorFlow SavedModel",
    "tensorflow": "a TensorFlow model",
    "python": "a Triton Python model (TritonPythonModel)",
    "openvino": "an OpenVINO model",
}
_TRUE = {"true", "t", "1", "True"}
_POSITION = re.compile(r"^\d+:\d+ : ")  # protobuf's "line:column : " error prefix
_KINDS = {
    pb.ModelInstanceGroup.KIND_AUTO: "auto",
    pb.ModelInstanceGroup.KIND_CPU: "cpu",
    pb.ModelInstanceGroup.KIND_GPU: "gpu",
}


@dataclass(frozen=True)
class TritonConfig:
    """A ``config.pbtxt`` read into our configuration: ``config`` plus every setting that was ignored.

    ``ignored`` holds one entry per setting we read but do not honour, as ``"where: why"`` (e.g.
    ``"output[fc6_1].label_filename: not supported (ignored)"``).
    """

    config: ModelConfigFile
    ignored: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Setting:
    """One field as written in the text: its path (field names and indices), known to our subset or not."""

    path: tuple[str | int, ...]
    known: bool
    value: str | None  # the token as written, for scalars

    @property
    def key(self) -> str:
        """The path without indices, e.g. ``input.format``."""
        return ".".join(p for p in self.path if isinstance(p, str))


def _value(tokenizer: text_format.Tokenizer) -> str:
    token = tokenizer.token
    tokenizer.NextToken()
    while token[:1] in ("'", '"') and tokenizer.token[:1] in ("'", '"'):  # adjacent strings concatenate
        token += tokenizer.token
        tokenizer.NextToken()
    return token


def _walk(
    tokenizer: text_format.Tokenizer,
    descriptor: _descriptor.Descriptor | None,
    prefix: tuple[str | int, ...],
    out: list[_Setting],
    emit: list[str] | None,
) -> None:
    """Walk one message body: record its fields in ``out`` and write the fields our subset knows to
    ``emit``. ``descriptor`` None: inside an unknown field (consumed, neither recorded nor written)."""
    counts: Counter[str] = Counter()

    def block(name: str, field_descriptor: Any) -> None:
        path: tuple[str | int, ...] = (*prefix, name)
        if field_descriptor is not None and field_descriptor.is_repeated:
            path = (*path, counts[name])  # input[0], input[1], ...
            counts[name] += 1
        if descriptor is not None:
            out.append(_Setting(path, field_descriptor is not None, None))
        closing = "}" if tokenizer.TryConsume("{") else (tokenizer.Consume("<") or ">")
        known = field_descriptor is not None and emit is not None
        inner: list[str] | None = [] if known else None
        _walk(tokenizer, field_descriptor.message_type if field_descriptor is not None else None, path, out, inner)
        tokenizer.Consume(closing)
        if known and emit is not None and inner is not None:
            emit.append(f"{name} {{\n{''.join(inner)}}}\n")

    def scalar(name: str, field_descriptor: Any) -> str:
        value = _value(tokenizer)
        if descriptor is not None:
            out.append(_Setting((*prefix, name), field_descriptor is not None, value))
        if emit is not None and field_descriptor is not None and descriptor is not None:
            try:  # check the value here, so that an error points at the user's line
                text_format.Parse(f"{name}: {value}", message_factory.GetMessageClass(descriptor)())
            except text_format.ParseError as err:
                raise tokenizer.ParseErrorPreviousToken(f"{name}: {_POSITION.sub('', str(err))}") from None
        return value

    while not (tokenizer.AtEnd() or tokenizer.LookingAt("}") or tokenizer.LookingAt(">")):
        name = tokenizer.ConsumeIdentifierOrNumber()
        field_descriptor = descriptor.fields_by_name.get(name) if descriptor is not None else None
        write = emit is not None and field_descriptor is not None
        tokenizer.TryConsume(":")
        if tokenizer.TryConsume("["):  # a list, with or without the colon (Triton writes `input [ ... ]`)
            values: list[str] = []
            while not tokenizer.TryConsume("]"):
                if tokenizer.LookingAt("{") or tokenizer.LookingAt("<"):
                    block(name, field_descriptor)
                else:
                    values.append(scalar(name, field_descriptor))
                if not tokenizer.LookingAt("]"):
                    tokenizer.Consume(",")
            if write and values and emit is not None:
                emit.append(f"{name}: [{', '.join(values)}]\n")
        elif tokenizer.LookingAt("{") or tokenizer.LookingAt("<"):
            block(name, field_descriptor)
        else:
            value = scalar(name, field_descriptor)
            if write and emit is not None:
                emit.append(f"{name}: {value}\n")
        if not tokenizer.TryConsume(","):
            tokenizer.TryConsume(";")


def _split(text: str) -> tuple[list[_Setting], str]:
    """Every field the text sets (outermost unknown fields included, not their insides), and the text of
    the fields our ModelConfig subset declares, for protobuf's parser."""
    tokenizer = text_format.Tokenizer(text.splitlines())
    out: list[_Setting] = []
    emit: list[str] = []
    _walk(tokenizer, pb.ModelConfig.DESCRIPTOR, (), out, emit)
    return out, "".join(emit)


def _where(path: tuple[str | int, ...], message: pb.ModelConfig) -> str:
    """A readable location: ``input[data_0].format``, ``instance_group[1].rate_limiter``, ``optimization``."""
    parts: list[str] = []
    for i, part in enumerate(path):
        if isinstance(part, str):
            parts.append(part)
            continue
        name = path[i - 1]
        label = str(part)
        if i == 1 and name in ("input", "output"):  # a top-level tensor: name it
            tensors = message.input if name == "input" else message.output
            if part < len(tensors) and tensors[part].name:
                label = tensors[part].name
        parts[-1] += f"[{label}]"
    return ".".join(parts)


def _backend(message: pb.ModelConfig) -> str | None:
    """Our backend for the file's platform/backend, None when it names neither (inferred from the file)."""
    chosen: dict[str, str] = {}
    for what, value in (("platform", message.platform), ("backend", message.backend)):
        if not value:
            continue
        for fmt in BACKENDS.values():
            if value in (fmt.triton_platforms if what == "platform" else fmt.triton_backends):
                chosen[what] = fmt.name
                break
        else:
            served = ", ".join(
                f"{'/'.join(fmt.triton_platforms + fmt.triton_backends)} ({fmt.name})"
                for fmt in BACKENDS.values()
                if fmt.triton_platforms or fmt.triton_backends
            )
            kind = _FOREIGN_PLATFORMS.get(value, "a model kind tensorwire has no backend for")
            raise RepositoryConfigError(f"{what} {value!r} is {kind}; tensorwire serves {served}")
    if len(set(chosen.values())) > 1:
        raise RepositoryConfigError(
            f"platform {message.platform!r} and backend {message.backend!r} name different backends; keep one"
        )
    return next(iter(chosen.values()), None)


def _datatype(value: int, where: str) -> str:
    name = pb.DataType.Name(value)
    if value == pb.TYPE_INVALID:
        raise RepositoryConfigError(f"{where} has no data_type (or TYPE_INVALID); give e.g. TYPE_FP32")
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def _tensor(tensor: pb.ModelInput | pb.ModelOutput, where: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": tensor.name,
        "datatype": _datatype(tensor.data_type, where),
        "dims": [int(d) for d in tensor.dims],
    }
    if tensor.HasField("reshape"):
        spec["reshape"] = [int(d) for d in tensor.reshape.shape]
    return spec


def _dynamic_batching(message: pb.ModelConfig, present: set[str], ignored: list[str]) -> dict[str, Any]:
    """Our dynamic_batching table. Without Triton's block the batcher is still on, as Triton's
    auto-complete turns it on (default settings, no delay) for a model with a batch dimension."""
    if not message.HasField("dynamic_batching"):
        return {"max_queue_delay_us": 0}
    b = message.dynamic_batching
    table: dict[str, Any] = {
        "max_queue_delay_us": int(b.max_queue_delay_microseconds),
        "preferred_batch_sizes": [int(s) for s in b.preferred_batch_size],
    }
    if b.priority_levels:  # 0: no priorities (Triton's default)
        table["priority_levels"] = int(b.priority_levels)
        table["default_priority_level"] = int(b.default_priority_level)
    if b.preserve_ordering:
        ignored.append(
            "dynamic_batching.preserve_ordering: responses of one stream keep their order; unary calls "
            "have no order to keep (ignored)"
        )
    if b.HasField("default_queue_policy"):
        q = b.default_queue_policy
        table["default_timeout_us"] = int(q.default_timeout_microseconds)
        if q.max_queue_size:
            table["max_queue_size"] = int(q.max_queue_size)
        elif "dynamic_batching.default_queue_policy.max_queue_size" in present:
            ignored.append(
                "dynamic_batching.default_queue_policy.max_queue_size: 0 (unbounded) is not offered; "
                "the queue is bounded at the default 1024 (ignored)"
            )
        if q.timeout_action == pb.ModelQueuePolicy.DELAY:
            ignored.append(
                "dynamic_batching.default_queue_policy.timeout_action: DELAY is not offered; timed-out "
                "requests are rejected (ignored)"
            )
        if "dynamic_batching.default_queue_policy.allow_timeout_override" in present and not (q.allow_timeout_override):
            ignored.append(
                "dynamic_batching.default_queue_policy.allow_timeout_override: false is not offered; a "
                "request's own timeout is always honoured (ignored)"
            )
    return table


def _instance_groups(message: pb.ModelConfig, ignored: list[str]) -> list[dict[str, Any]]:
    groups = []
    for i, group in enumerate(message.instance_group):
        entry: dict[str, Any] = {"kind": _KINDS.get(group.kind, "auto")}
        if group.kind == pb.ModelInstanceGroup.KIND_MODEL:
            ignored.append(f"instance_group[{i}].kind: KIND_MODEL is served as KIND_AUTO (ignored)")
        if group.count:  # 0: Triton's default of one instance
            entry["count"] = int(group.count)
        if group.gpus:
            entry["gpus"] = [int(g) for g in group.gpus]
        if group.name:
            ignored.append(f"instance_group[{i}].name: replicas are named <model>_<index> (ignored)")
        groups.append(entry)
    return groups


def parse_triton_config(text: str, model_name: str, source: str = TRITON_CONFIG_FILE) -> TritonConfig:
    """Read the text of a ``config.pbtxt`` for the model folder ``model_name``.

    Errors (all RepositoryConfigError, message starting with ``source``): text that is not protobuf text
    format of Triton's ModelConfig (line and column from protobuf's parser); a ``name`` other than the
    folder's; a model that needs a feature tensorwire does not have (the reason says which); values our
    schema rejects (as for ``config.toml``).
    """
    message = pb.ModelConfig()
    try:
        settings, known_text = _split(text)
        text_format.Parse(known_text, message)
    except text_format.ParseError as err:
        raise RepositoryConfigError(
            f"{source}: not a Triton model configuration in protobuf text format: {err}"
        ) from None
    try:
        return _convert(message, settings, model_name, source)
    except RepositoryConfigError as err:
        message_text = str(err)
        raise RepositoryConfigError(
            message_text if message_text.startswith(source) else f"{source}: {message_text}"
        ) from None


def _convert(message: pb.ModelConfig, settings: list[_Setting], model_name: str, source: str) -> TritonConfig:
    needs = []
    ignored: list[str] = []
    for setting in settings:
        if setting.known:
            continue
        where = _where(setting.path, message)
        if setting.key in _NEEDS:
            needs.append(f"{where}: {_NEEDS[setting.key]}")
        elif setting.key in _NEEDS_WHEN_TRUE:
            if setting.value in _TRUE:
                needs.append(f"{where}: {_NEEDS_WHEN_TRUE[setting.key]}")
        else:
            ignored.append(f"{where}: not supported (ignored)")
    if message.model_transaction_policy.decoupled:
        needs.append("model_transaction_policy.decoupled: decoupled responses (zero or many per request)")
    if needs:
        raise RepositoryConfigError(f"the model needs what tensorwire cannot do: {'; '.join(needs)}")
    if message.name and message.name != model_name:
        raise RepositoryConfigError(
            f"name {message.name!r} differs from the model's folder {model_name!r}; they must match (as in Triton)"
        )
    present = {s.key for s in settings}
    data: dict[str, Any] = {}
    backend = _backend(message)
    if backend is not None:
        data["backend"] = backend
    if "max_batch_size" in present:  # absent: completed from the model at load
        data["max_batch_size"] = int(message.max_batch_size)
    if message.HasField("version_policy"):
        policy = message.version_policy
        choice = policy.WhichOneof("policy_choice")
        if choice == "latest":
            data["version_policy"] = {"latest": int(policy.latest.num_versions)}
        elif choice == "all":
            data["version_policy"] = {"all": True}
        elif choice == "specific":
            data["version_policy"] = {"specific": [int(v) for v in policy.specific.versions]}
    if message.input:
        data["inputs"] = [_tensor(t, f"input {t.name!r}") for t in message.input]
    if message.output:
        data["outputs"] = [_tensor(t, f"output {t.name!r}") for t in message.output]
    if message.default_model_filename:
        data["default_model_filename"] = message.default_model_filename
    data["dynamic_batching"] = _dynamic_batching(message, present, ignored)
    if message.instance_group:
        data["instance_group"] = _instance_groups(message, ignored)
    if message.parameters:
        data["metadata"] = {key: value.string_value for key, value in sorted(message.parameters.items())}
    return TritonConfig(parse_model_config(data, source), ignored)


def read_triton_config(path: Path, model_name: str) -> TritonConfig:
    """Read ``<model>/config.pbtxt``; see :func:`parse_triton_config`. Unreadable files raise
    RepositoryConfigError naming ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RepositoryConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    except OSError as err:
        raise RepositoryConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    return parse_triton_config(text, model_name, str(path))
