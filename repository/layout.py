"""A model repository on disk: which folders are models and versions, and each model's configuration.

Layout::

    <repo>/<model>/config.toml          tensorwire's configuration, or
    <repo>/<model>/config.pbtxt         Triton's (protobuf text format), or neither
    <repo>/<model>/<version>/model.onnx | model.pt | model.py | ...

A model folder holds a configuration file or at least one version folder (a positive integer without
leading zeros); the configuration is optional: what it leaves out is inferred (the backend from the
model file here, ``max_batch_size`` and the tensors from the model at load). Both files in one folder
is an error, so that no setting is silently overridden.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from tensorwire.repository.backends import BackendInferenceError, infer_backend
from tensorwire.repository.config import CONFIG_FILE, ModelConfigFile, RepositoryConfigError, read_toml_config
from tensorwire.repository.triton import TRITON_CONFIG_FILE, read_triton_config

VERSION_FOLDER = re.compile(r"[1-9][0-9]*")  # ASCII digits, no leading zero: the folder is str(version)


@dataclass(frozen=True)
class ModelSource:
    """A model's configuration as read from its folder, with what was inferred and what was ignored.

    ``config`` has its backend filled in; ``path`` is the file it came from (None: no file, everything
    inferred); ``inferred`` maps a setting to how it was inferred (e.g. ``{"backend": "onnxruntime
    (from 1/model.onnx)"}``); ``ignored`` lists settings of a ``config.pbtxt`` that are not honoured.
    """

    config: ModelConfigFile
    path: Path | None
    inferred: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        """The configuration's file name, or ``"(none)"``."""
        return self.path.name if self.path is not None else "(none)"


def available_versions(model_dir: Path) -> list[int]:
    """Numbered version folders under a model folder, ascending (others ignored)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION_FOLDER.fullmatch(p.name))


def is_model_folder(model_dir: Path) -> bool:
    """Whether a folder is a model: it holds ``config.toml``, ``config.pbtxt`` or a version folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or model_dir.name.startswith("."):
        return False
    if (model_dir / CONFIG_FILE).exists() or (model_dir / TRITON_CONFIG_FILE).exists():
        return True
    return bool(available_versions(model_dir))


def list_models(repo: Path) -> list[str]:
    """Model folder names in a repository, sorted (see :func:`is_model_folder`)."""
    repo = Path(repo)
    return sorted(p.name for p in repo.iterdir() if is_model_folder(p)) if repo.is_dir() else []


def read_model_config(model_dir: Path) -> ModelSource:
    """Read a model folder's configuration (``config.toml``, ``config.pbtxt`` or none) and fill in its
    backend from the model file when the configuration does not name one.

    Raises RepositoryConfigError (message starting with the file or folder) when both files exist, when
    the file is invalid or asks for something tensorwire cannot do, or when the backend cannot be told
    from the version folders' files.
    """
    model_dir = Path(model_dir)
    toml_path, pbtxt_path = model_dir / CONFIG_FILE, model_dir / TRITON_CONFIG_FILE
    ignored: list[str] = []
    if toml_path.exists() and pbtxt_path.exists():
        raise RepositoryConfigError(
            f"{model_dir}: holds both {CONFIG_FILE} and {TRITON_CONFIG_FILE}; keep one (both are not allowed, "
            "so that neither silently overrides the other)"
        )
    path: Path | None
    if toml_path.exists():
        path, config = toml_path, read_toml_config(toml_path)
    elif pbtxt_path.exists():
        triton = read_triton_config(pbtxt_path, model_dir.name)
        path, config, ignored = pbtxt_path, triton.config, triton.ignored
    else:
        path, config = None, ModelConfigFile()
    inferred: dict[str, str] = {}
    if config.backend is None:
        versions = config.version_policy.select(available_versions(model_dir))
        try:
            backend, evidence = infer_backend(model_dir, versions, config.default_model_filename)
        except BackendInferenceError as err:
            raise RepositoryConfigError(f"{path or model_dir}: {err}") from None
        config = config.model_copy(update={"backend": backend})
        inferred["backend"] = f"{backend} (from {evidence})"
    return ModelSource(config, path, inferred, ignored)


def load_model_config(model_dir: Path) -> ModelConfigFile:
    """The configuration of a model folder, backend filled in: ``read_model_config(model_dir).config``."""
    return read_model_config(model_dir).config
