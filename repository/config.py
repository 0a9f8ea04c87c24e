"""The model repository format: the one thing the trainer writes and the server reads.

Layout::

    <repo>/<model>/config.toml
    <repo>/<model>/<version>/model.onnx | model.pt

``config.toml`` is validated here with pydantic; every error names the file,
the field and what is allowed, so a user can fix it without reading code.
This module imports neither grpc nor any model runtime.
"""

from __future__ import annotations

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

CONFIG_FILE = "config.toml"
DEFAULT_FILENAMES = {"onnxruntime": "model.onnx", "torchscript": "model.pt", "python": "model.py"}
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "python": "python"}
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch
VERSION_FOLDER = re.compile(r"[1-9][0-9]*")  # ASCII digits, no leading zero: the folder is str(version)

Datatype = Literal[DATATYPES]  # type: ignore[valid-type]
Dim = Annotated[int, Field(ge=-1)]


class RepositoryConfigError(ValueError):
    """A model's ``config.toml`` is missing, unreadable or invalid."""


def check_model_name(name: str) -> str:
    """Reject names that are not a single safe folder name (no path traversal)."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise RepositoryConfigError(
            f"invalid model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output; ``dims`` exclude the batch dimension, -1 = variable."""

    name: str = Field(min_length=1)
    datatype: Datatype
    dims: list[Dim]

    @field_validator("dims")
    @classmethod
    def _no_zero_dims(cls, dims: list[int]) -> list[int]:
        if 0 in dims:
            raise ValueError(f"dims {dims} contain 0; use a positive size or -1 for variable")
        return dims


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
    """The validated contents of one model's ``config.toml``."""

    backend: Literal["onnxruntime", "torchscript", "python"]
    max_batch_size: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    default_model_filename: str | None = None
    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_group: list[InstanceGroup] = [InstanceGroup()]
    warmup: Literal["auto", "all", "powers_of_two", "none"] = "auto"
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
        if max_batch_size is None:  # invalid itself: already reported
            return batching
        too_big = [p for p in batching.preferred_batch_sizes if p > max(max_batch_size, 1)]
        if too_big:
            raise ValueError(
                f"preferred_batch_sizes {too_big} exceed max_batch_size {max_batch_size}; "
                "lower them or raise max_batch_size"
            )
        return batching

    @field_validator("default_model_filename")
    @classmethod
    def _plain_file_name(cls, name: str | None) -> str | None:
        if name and ("/" in name or "\\" in name or name.startswith(".")):
            raise ValueError(
                f"default_model_filename {name!r} must be a plain file name inside the version folder"
            )
        return name

    @property
    def model_filename(self) -> str:
        return self.default_model_filename or DEFAULT_FILENAMES[self.backend]

    @property
    def platform(self) -> str:
        return PLATFORMS[self.backend]

    @property
    def batching(self) -> bool:
        """Whether requests are combined into batches (needs a batch dimension)."""
        return self.max_batch_size > 0 and self.dynamic_batching.enabled

    def to_toml_dict(self) -> dict[str, Any]:
        """A plain dict for writing back as TOML (defaults left out)."""
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
            "backend": self.backend
        }


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "value_error":  # our own validators: drop pydantic's "Value error, " prefix
        message = message.removeprefix("Value error, ")
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


def load_model_config(model_dir: Path) -> ModelConfigFile:
    """Read and validate ``<model_dir>/config.toml``."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepositoryConfigError(f"{path}: missing; every model folder needs a {CONFIG_FILE}") from None
    except UnicodeDecodeError as err:
        raise RepositoryConfigError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from None
    except OSError as err:
        raise RepositoryConfigError(f"{path}: cannot be read: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise RepositoryConfigError(f"{path}: not valid TOML: {err}") from None
    return parse_model_config(data, str(path))


def available_versions(model_dir: Path) -> list[int]:
    """Numbered version folders under a model folder, ascending (others ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION_FOLDER.fullmatch(p.name))


def list_models(repo: Path) -> list[str]:
    """Model folder names in a repository (folders holding a config.toml)."""
    repo = Path(repo)
    return (
        sorted(p.name for p in repo.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists())
        if repo.is_dir()
        else []
    )


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
