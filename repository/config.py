"""The schema of ``config.toml``, validated with pydantic, and the TOML file's reading and writing.

Layout::

    <repo>/<model>/config.toml                (optional: see ``tensorwire.repository.layout``)
    <repo>/<model>/<version>/model.onnx | model.pt | model.pt2 | model.py

Every error names the file, the field and what is allowed, so a user can fix it
without reading code. ``backend`` and ``max_batch_size`` may be left out: the
backend then follows from the model file and ``max_batch_size`` from the model's
shapes at load (see ``layout.read_model_config`` and ``autocomplete``).
This module imports neither grpc nor any model runtime.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tensorwire.proto.codec import DATATYPES
from tensorwire.repository.backends import BACKENDS, default_filenames, platforms

CONFIG_FILE = "config.toml"
#: backend -> default model file / reported platform (derived from ``backends.BACKENDS``).
DEFAULT_FILENAMES = default_filenames()
PLATFORMS = platforms()
_NAMED_FIELD = re.compile(r"([A-Za-z_][\w]*(?:\.\w+)*): (.*)", re.DOTALL)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch

Datatype = Literal[DATATYPES]  # type: ignore[valid-type]
BackendName = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]
Dim = Annotated[int, Field(ge=-1)]


class RepositoryConfigError(ValueError):
    """A model's configuration is unreadable or invalid, or asks for something tensorwire cannot honour."""


def check_model_name(name: str) -> str:
    """Reject names that are not a single safe folder name (no path traversal)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise RepositoryConfigError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The largest share of a padded batch's elements that may be padding, unless the config says otherwise.
DEFAULT_MAX_PADDED_SHARE = 0.25

_INT_RANGES = {
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
}


class Padding(_Strict):
    """How a variable dimension is padded when requests of different lengths share a batch.

    On an input (``[inputs.padding]``): ``value`` fills the padded positions (default 0); ``axis`` is the
    variable dimension that is padded, an index into ``dims`` (so without the batch dimension; default: the
    only -1 in ``dims``); ``mask`` optionally names a model input that clients do not send and the server
    builds per batch: shape ``[batch, padded length]``, 1 where a position holds the request's data and 0
    where it is padding, in the datatype the model file declares for it (a Hugging Face
    ``attention_mask``).

    On an output (``[outputs.padding]``): ``input`` names the padded input whose length this output's
    ``axis`` (default: its only -1) follows; each request gets that axis cut back to its own length. An
    output without ``padding`` is returned whole per row (e.g. a pooled classifier's logits).
    """

    value: int | float | bool | None = None
    axis: Annotated[int, Field(ge=0)] | None = None
    mask: Annotated[str, Field(min_length=1)] | None = None
    input: Annotated[str, Field(min_length=1)] | None = None

    @property
    def pad_value(self) -> int | float | bool:
        """The value padded positions hold (0 when not given)."""
        return 0 if self.value is None else self.value


def _padded_axis(padding: Padding, dims: list[int], where: str) -> int:
    """The padded axis of a tensor with ``dims`` (given or the only variable one); ValueError naming ``where``."""
    variable = [axis for axis, dim in enumerate(dims) if dim == -1]
    if padding.axis is None:
        if len(variable) != 1:
            raise ValueError(
                f"{where}: dims {dims} have {len(variable)} variable (-1) dimensions; say which one is padded "
                "with axis = N (an index into dims, which exclude the batch dimension)"
            )
        return variable[0]
    if padding.axis >= len(dims) or dims[padding.axis] != -1:
        raise ValueError(
            f"{where}.axis: {padding.axis} is not a variable (-1) dimension of dims {dims} (which exclude the "
            f"batch dimension); the variable ones are at {variable}"
        )
    return padding.axis


def _check_pad_value(value: int | float | bool, datatype: str, where: str) -> None:
    if datatype == "BYTES":
        raise ValueError(f"{where}: BYTES inputs cannot be padded (strings have no fixed size to pad)")
    if datatype == "BOOL":
        if not isinstance(value, bool) and value not in (0, 1):
            raise ValueError(f"{where}.value: {value!r} is not a BOOL (use true, false, 0 or 1)")
        return
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}.value: {value!r} is not a {datatype} (an integer in [{low}, {high}])")
    elif isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{where}.value: {value!r} is not a finite number for {datatype}")


class TensorSpec(_Strict):
    """One input or output as clients see it: ``dims`` exclude the batch dimension, -1 = variable.

    ``reshape`` (Triton's ModelTensorReshape) is the shape the model file has for this tensor, also
    without the batch dimension, when it differs from ``dims``: e.g. ``dims = [1]``, ``reshape = []``
    for a model that takes ``[batch]`` while clients send ``[batch, 1]``. The server reshapes inputs
    before the run and outputs after it, so only a reshape between two fixed shapes with the same number
    of elements (or one equal to ``dims``) is accepted.
    """

    name: str = Field(min_length=1)
    datatype: Datatype
    dims: list[Dim]
    reshape: list[Dim] | None = None
    padding: Padding | None = None

    @field_validator("dims", "reshape")
    @classmethod
    def _no_zero_dims(cls, dims: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if dims is not None and 0 in dims:
            raise ValueError(f"{info.field_name} {dims} contain 0; use a positive size or -1 for variable")
        return dims

    @model_validator(mode="after")
    def _reshape_possible(self) -> TensorSpec:
        if self.reshape is None or self.reshape == self.dims:
            return self
        if -1 in self.dims or -1 in self.reshape:
            raise ValueError(
                f"{self.name!r}: reshape {self.reshape} differs from dims {self.dims} and has a variable (-1) "
                "dimension; only a reshape between fixed shapes of the same size can be honoured"
            )
        if math.prod(self.dims) != math.prod(self.reshape):
            raise ValueError(
                f"{self.name!r}: reshape {self.reshape} holds {math.prod(self.reshape)} elements, dims "
                f"{self.dims} hold {math.prod(self.dims)}; they must hold the same number"
            )
        return self

    @property
    def padded_axis(self) -> int | None:
        """The padded axis (index into ``dims``), or None when this tensor is not padded (validated)."""
        return None if self.padding is None else _padded_axis(self.padding, self.dims, self.name)

    @property
    def model_dims(self) -> list[int]:
        """The shape the model file has for this tensor (without the batch dimension)."""
        return self.dims if self.reshape is None else self.reshape


class VersionPolicy(_Strict):
    """Which numbered versions to serve: the latest N, all, or a specific list."""

    latest: Annotated[int, Field(ge=1)] | None = None
    all: bool | None = None
    specific: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ValueError("give exactly one of latest = N, all = true, specific = [versions]")
        if self.all is False:
            raise ValueError("all = false selects nothing; use latest = N or specific = [...]")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve, ascending."""
        ordered = sorted(available)
        if self.latest is not None:
            return ordered[-self.latest :]
        if self.all:
            return ordered
        return [v for v in ordered if v in set(self.specific or [])]


class DynamicBatching(_Strict):
    """Batching and queueing settings of one model (Triton's ``dynamic_batching``; README, Dynamic batching)."""

    enabled: bool = True
    max_queue_delay_us: Annotated[int, Field(ge=0, le=10_000_000)] = 100
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = []
    max_queue_size: Annotated[int, Field(ge=1)] = 1024
    default_timeout_us: Annotated[int, Field(ge=0)] = 0
    priority_levels: Annotated[int, Field(ge=1, le=16)] = 1
    default_priority_level: Annotated[int, Field(ge=0)] = 0
    # The largest share of a padded batch's input elements that may be padding (only for inputs with
    # ``padding``): requests of different lengths share a batch only while the padding stays under it.
    max_padded_share: Annotated[float, Field(ge=0.0, lt=1.0)] = DEFAULT_MAX_PADDED_SHARE

    @model_validator(mode="after")
    def _levels(self) -> DynamicBatching:
        if self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"default_priority_level {self.default_priority_level} exceeds priority_levels {self.priority_levels}"
            )
        return self


class InstanceGroup(_Strict):
    """A set of replicas: ``count`` per listed device."""

    kind: Literal["cpu", "gpu", "auto"] = "auto"
    count: Annotated[int, Field(ge=1, le=256)] = 1
    gpus: list[Annotated[int, Field(ge=0)]] | None = None
    threads: Annotated[int, Field(ge=1)] | None = None  # intra-op threads per CPU replica
    # Let ONNX Runtime's intra-op threads spin while idle: a little lower latency on an otherwise idle
    # machine, but the spinning burns the CPU that the event loop needs (measured: +40 % throughput off).
    spin_wait: bool = False

    @model_validator(mode="after")
    def _gpus_only_for_gpu(self) -> InstanceGroup:
        if self.gpus is not None and self.kind == "cpu":
            raise ValueError("gpus is set but kind is 'cpu'; use kind = 'gpu' or 'auto'")
        return self


class ModelConfigFile(_Strict):
    """The validated contents of one model's ``config.toml`` (or of a Triton ``config.pbtxt`` read into it).

    ``backend`` None: not given; ``layout.read_model_config`` fills it in from the model file.
    ``max_batch_size`` None: not given; the server completes it from the model's shapes at load
    (``autocomplete.complete_max_batch_size``); 0 says the model takes no batch dimension.
    """

    backend: BackendName | None = None
    max_batch_size: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    default_model_filename: str | None = None
    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_group: list[InstanceGroup] = [InstanceGroup()]
    warmup: Literal["auto", "all", "powers_of_two", "none"] = "auto"
    # The most one batch may run (seconds; 0 = no limit). Past it the batch fails with DEADLINE_EXCEEDED
    # and its replica is replaced: a hung model must not hold its replica, its queue or a shutdown.
    execution_timeout_s: Annotated[float, Field(ge=0, le=86_400)] = 60.0
    metadata: dict[str, str] = {}

    @field_validator("inputs", "outputs")
    @classmethod
    def _tensor_list(cls, specs: list[TensorSpec] | None, info: ValidationInfo) -> list[TensorSpec] | None:
        if specs is None:
            return specs
        if not specs:
            raise ValueError(f"{info.field_name} is empty; omit it to read the tensors from the model file")
        names = [s.name for s in specs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"{info.field_name} repeat the tensor name(s) {repeated}; names must be unique")
        return specs

    @field_validator("dynamic_batching")
    @classmethod
    def _preferred_sizes_fit(cls, batching: DynamicBatching, info: ValidationInfo) -> DynamicBatching:
        max_batch_size = info.data.get("max_batch_size")
        if max_batch_size is None:  # not given (completed at load, at least as large), or invalid: reported
            return batching
        too_big = [p for p in batching.preferred_batch_sizes if p > max(max_batch_size, 1)]
        if too_big:
            raise ValueError(
                f"preferred_batch_sizes {too_big} exceed max_batch_size {max_batch_size}; "
                "lower them or raise max_batch_size"
            )
        return batching

    @model_validator(mode="after")
    def _padding_consistent(self) -> ModelConfigFile:
        """Padding declarations agree with the tensors (errors name ``inputs.N.padding...``)."""
        inputs, outputs = self.inputs or [], self.outputs or []
        padded: dict[str, TensorSpec] = {}
        masks: set[str] = set()
        names = {spec.name for spec in inputs}
        for i, spec in enumerate(inputs):
            if spec.padding is None:
                continue
            where = f"inputs.{i}.padding"
            p = spec.padding
            if p.input is not None:
                raise ValueError(f"{where}.input: is for outputs (the input an output's length follows); remove it")
            if spec.reshape is not None and spec.reshape != spec.dims:
                raise ValueError(f"{where}: a padded input cannot also be reshaped")
            _padded_axis(p, spec.dims, where)
            _check_pad_value(p.pad_value, spec.datatype, where)
            if p.mask is not None:
                if p.mask in names:
                    raise ValueError(
                        f"{where}.mask: {p.mask!r} is also listed in inputs; the server builds the mask, so clients "
                        "do not send it: remove it from inputs"
                    )
                if p.mask in masks:
                    raise ValueError(f"{where}.mask: {p.mask!r} is built for another input already; name it once")
                masks.add(p.mask)
            padded[spec.name] = spec
        if padded and self.max_batch_size == 0:
            raise ValueError(
                "max_batch_size: 0 (no batch dimension), but inputs with padding need a batch dimension to pad "
                "across; set max_batch_size > 0 or remove padding"
            )
        for i, spec in enumerate(outputs):
            if spec.padding is None:
                continue
            where = f"outputs.{i}.padding"
            p = spec.padding
            if p.value is not None or p.mask is not None:
                raise ValueError(f"{where}: value and mask are for inputs; an output's padding has input and axis")
            if p.input is None:
                raise ValueError(f"{where}.input: missing; name the padded input whose length this output follows")
            if p.input not in padded:
                raise ValueError(
                    f"{where}.input: {p.input!r} is not a padded input; padded inputs: {sorted(padded) or 'none'}"
                )
            _padded_axis(p, spec.dims, where)
        return self

    @field_validator("default_model_filename")
    @classmethod
    def _plain_file_name(cls, name: str | None) -> str | None:
        if name and ("/" in name or "\\" in name or name.startswith(".")):
            raise ValueError(f"default_model_filename {name!r} must be a plain file name inside the version folder")
        return name

    def _format(self) -> Any:
        if self.backend is None:
            raise RepositoryConfigError(
                "the backend is not known yet: it is read from the model file by read_model_config"
            )
        return BACKENDS[self.backend]

    @property
    def model_filename(self) -> str:
        """The model file inside each version folder."""
        return self.default_model_filename or self._format().filename

    @property
    def platform(self) -> str:
        """The platform string reported in ModelMetadata and ModelConfig (``onnxruntime_onnx``, ...)."""
        return self._format().platform

    @property
    def batching(self) -> bool:
        """Whether requests are combined into batches (needs a batch dimension)."""
        return (self.max_batch_size or 0) > 0 and self.dynamic_batching.enabled

    def tensor_spec(self, name: str) -> TensorSpec | None:
        """The config's entry for the input or output ``name``, if it lists one."""
        for spec in (self.inputs or []) + (self.outputs or []):
            if spec.name == name:
                return spec
        return None

    def to_toml_dict(self) -> dict[str, Any]:
        """A plain dict for writing back as TOML (defaults and unset values left out)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True)


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "value_error":  # our own validators: drop pydantic's "Value error, " prefix
        message = message.removeprefix("Value error, ")
        named = _NAMED_FIELD.match(message)
        if named and not error["loc"]:  # a whole-config check that names its field first: "inputs.0.padding: ..."
            where, message = named.group(1), named.group(2)
    if error["type"] == "extra_forbidden":
        message = "unknown key (check its spelling and section)"
    elif error["type"] == "literal_error":
        message = f"{message} (got {error.get('input')!r})"
    elif "input" in error and not isinstance(error["input"], dict):
        message = f"{message} (got {error['input']!r})"
    return f"field '{where}': {message}"


def parse_model_config(data: dict[str, Any], source: str = CONFIG_FILE) -> ModelConfigFile:
    """Validate a config dict; errors name ``source``, the field and what is allowed.

    Validation is strict: TOML values carry their types, so ``max_batch_size =
    "64"``, ``max_batch_size = true`` or ``enabled = "yes"`` are mistakes to
    report, not values to coerce.
    """
    try:
        return ModelConfigFile.model_validate(data, strict=True)
    except ValidationError as err:
        lines = "; ".join(_describe(e) for e in err.errors())
        raise RepositoryConfigError(f"{source}: {lines}") from None


def read_toml_config(path: Path) -> ModelConfigFile:
    """Read and validate one ``config.toml`` file; every error names ``path``.

    Raises RepositoryConfigError when the file is missing, unreadable, not UTF-8, not TOML or invalid.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryConfigError(f"{path}: missing") from None
    except UnicodeDecodeError as err:
        raise RepositoryConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    except OSError as err:
        raise RepositoryConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise RepositoryConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_model_config(data, str(path))


def _umask() -> int:
    """The process umask, read without changing it (Linux: /proc), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_model_config(config: ModelConfigFile, model_dir: Path) -> Path:
    """Write ``config.toml`` atomically (write a temp file, then rename)."""
    import tomli_w  # only the trainer writes configs

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILE
    # A unique temporary name per writer: concurrent publishers never share a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".toml.tmp", dir=model_dir)
    # mkstemp creates the file 0600; give it the mode of any other new file (0644 under umask 022),
    # as the model files beside it have, so a server running as another user can read it.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(tomli_w.dumps(config.to_toml_dict()))
    os.replace(tmp, path)
    return path
