"""The model repository format: the one contract between the trainer (which writes it) and the server
(which reads it).

Layout::

    <repo>/<model>/config.toml   or   <repo>/<model>/config.pbtxt (Triton's)   or no configuration
    <repo>/<model>/<version>/model.onnx | model.pt | model.py

Modules: ``backends`` (which backend serves which model file: the table a new backend extends),
``config`` (the validated schema of ``config.toml``, reading and writing it), ``triton`` (Triton's
``config.pbtxt`` read into that schema), ``layout`` (which folders are models and versions; a model's
configuration with its backend inferred), ``autocomplete`` (``max_batch_size`` completed from the
model's shapes). This package imports neither grpc, the server, the trainer nor any model runtime, so
both the server and the trainer can use it without importing each other.
"""

from tensorwire.repository.autocomplete import (
    DEFAULT_MAX_BATCH_SIZE,
    BatchDecision,
    complete_max_batch_size,
    completed,
)
from tensorwire.repository.backends import BACKENDS, BackendFormat, backend_for_filename, infer_backend
from tensorwire.repository.config import (
    CONFIG_FILE,
    DEFAULT_FILENAMES,
    PLATFORMS,
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    Padding,
    RepositoryConfigError,
    TensorSpec,
    VersionPolicy,
    check_model_name,
    parse_model_config,
    read_toml_config,
    write_model_config,
)
from tensorwire.repository.layout import (
    ModelSource,
    available_versions,
    is_model_folder,
    list_models,
    load_model_config,
    read_model_config,
)
from tensorwire.repository.triton import TRITON_CONFIG_FILE, TritonConfig, parse_triton_config, read_triton_config

__all__ = [
    "BACKENDS",
    "CONFIG_FILE",
    "DEFAULT_FILENAMES",
    "DEFAULT_MAX_BATCH_SIZE",
    "PLATFORMS",
    "TRITON_CONFIG_FILE",
    "BackendFormat",
    "BatchDecision",
    "DynamicBatching",
    "InstanceGroup",
    "ModelConfigFile",
    "ModelSource",
    "Padding",
    "RepositoryConfigError",
    "TensorSpec",
    "TritonConfig",
    "VersionPolicy",
    "available_versions",
    "backend_for_filename",
    "check_model_name",
    "complete_max_batch_size",
    "completed",
    "infer_backend",
    "is_model_folder",
    "list_models",
    "load_model_config",
    "parse_model_config",
    "parse_triton_config",
    "read_model_config",
    "read_toml_config",
    "read_triton_config",
    "write_model_config",
]
