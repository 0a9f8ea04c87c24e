"""The model repository format: the one contract between the trainer (which writes it) and the server
(which reads it).

Layout::

    <repo>/<model>/config.toml
    <repo>/<model>/<version>/model.onnx | model.pt | model.py

``tensorwire.repository.config`` holds the validated schema of ``config.toml`` and the helpers that read
and write a repository. This package imports neither grpc, the server, the trainer nor any model runtime,
so both the server and the trainer can use it without importing each other.
"""

from tensorwire.repository.config import (
    CONFIG_FILE,
    DEFAULT_FILENAMES,
    PLATFORMS,
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    RepositoryConfigError,
    TensorSpec,
    VersionPolicy,
    available_versions,
    check_model_name,
    list_models,
    load_model_config,
    parse_model_config,
    write_model_config,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_FILENAMES",
    "PLATFORMS",
    "DynamicBatching",
    "InstanceGroup",
    "ModelConfigFile",
    "RepositoryConfigError",
    "TensorSpec",
    "VersionPolicy",
    "available_versions",
    "check_model_name",
    "list_models",
    "load_model_config",
    "parse_model_config",
    "write_model_config",
]
