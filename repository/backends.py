"""Which backend serves which model file: the one table the repository format keeps about backends.

Each entry says how a backend's models look in a repository: the ``backend`` value of ``config.toml``,
the default file in a version folder (``<model>/<version>/<filename>``), the platform string reported
in ModelMetadata/ModelConfig, and the ``platform``/``backend`` values of a Triton ``config.pbtxt`` that
select it. A new backend adds one :class:`BackendFormat` to :data:`BACKENDS`; the ``config.toml``
schema, backend inference from files and the ``config.pbtxt`` reader all follow from this table.

This module imports no model runtime: it only names files.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BackendFormat:
    """How one backend's models appear in a model repository.

    ``name`` is the ``backend`` value in ``config.toml``; ``filename`` the default model file inside a
    version folder; ``platform`` what ModelMetadata and ModelConfig report (Triton's platform names
    where Triton has one, so its tools recognise the model); ``triton_platforms``/``triton_backends``
    the values of ``platform``/``backend`` in a Triton ``config.pbtxt`` that mean this backend (Triton's
    backend documentation lists them: ``onnxruntime_onnx``/``onnxruntime``, ``pytorch_libtorch``/``pytorch``).
    ``probe`` tells this backend's files from another backend's with the same file name (``model.pt2`` is
    a torch.export program or an AOTInductor package); None when the file name alone decides.
    """

    name: str
    filename: str
    platform: str
    triton_platforms: tuple[str, ...] = ()
    triton_backends: tuple[str, ...] = ()
    probe: Callable[[Path], bool] | None = None

    def serves(self, path: Path) -> bool:
        """Whether ``path`` (an existing file named like this backend's) is this backend's kind of file."""
        return self.probe is None or self.probe(path)

    @property
    def suffix(self) -> str:
        """The file extension (with its dot) that marks this backend's files, e.g. ``.onnx``."""
        return Path(self.filename).suffix


def _is_aoti_package(path: Path) -> bool:
    """An AOTInductor package (``torch._inductor.aoti_compile_and_package``) is a ``.pt2`` zip archive
    holding compiled code under ``<archive>/data/aotinductor/``; a ``torch.export.save`` program has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/data/aotinductor/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


#: backend name -> format, in the order used to describe them in messages.
BACKENDS: dict[str, BackendFormat] = {
    fmt.name: fmt
    for fmt in (
        BackendFormat("onnxruntime", "model.onnx", "onnxruntime_onnx", ("onnxruntime_onnx",), ("onnxruntime",)),
        BackendFormat("torchscript", "model.pt", "pytorch_libtorch", ("pytorch_libtorch",), ("pytorch",)),
        # Both .pt2 kinds have the same file name; the archive's contents tell them apart.
        BackendFormat("torch_export", "model.pt2", "pytorch_torch_export", probe=lambda p: not _is_aoti_package(p)),
        BackendFormat("aotinductor", "model.pt2", "pytorch_aotinductor", probe=_is_aoti_package),
        # Our Python backend (``class Model`` with ``execute(dict) -> dict``) is not Triton's Python
        # backend (``TritonPythonModel``), so no Triton name maps to it.
        BackendFormat("python", "model.py", "python"),
    )
}

#: Model files other servers use that no tensorwire backend can load: file name -> what it is.
#: Finding one explains a refusal better than "no model file" would.
FOREIGN_FILES: dict[str, str] = {
    "model.plan": "a TensorRT plan",
    "model.savedmodel": "a TensorFlow SavedModel",
    "model.graphdef": "a TensorFlow GraphDef",
    "model.xml": "an OpenVINO model",
}


def default_filenames() -> dict[str, str]:
    """backend name -> default model file name (``model.onnx``, ...)."""
    return {name: fmt.filename for name, fmt in BACKENDS.items()}


def platforms() -> dict[str, str]:
    """backend name -> platform string reported in metadata (``onnxruntime_onnx``, ...)."""
    return {name: fmt.platform for name, fmt in BACKENDS.items()}


def backend_for_filename(filename: str, path: Path | None = None) -> str | None:
    """The backend whose files end like ``filename`` (by extension), or None; when several backends share
    the extension (``.pt2``), the existing file ``path`` decides (without it: the first of them)."""
    suffix = Path(filename).suffix
    candidates = [fmt for fmt in BACKENDS.values() if suffix and suffix == fmt.suffix]
    if len(candidates) > 1 and path is not None and path.is_file():
        candidates = [fmt for fmt in candidates if fmt.serves(path)] or candidates
    return candidates[0].name if candidates else None


class BackendInferenceError(ValueError):
    """The backend cannot be told from the files of a model's version folders."""


def infer_backend(model_dir: Path, versions: list[int], filename: str | None = None) -> tuple[str, str]:
    """Tell a model's backend from the files in its version folders.

    ``versions`` are the version folders to be served; ``filename`` is the model's
    ``default_model_filename`` when the config gives one (then its extension decides). Returns
    ``(backend, evidence)`` where evidence names the file relative to ``model_dir`` (e.g.
    ``"1/model.onnx"``), for the load log.

    Raises BackendInferenceError when there is no version folder to look at, when a version folder holds
    none of the known files (or a file of another server, named), holds several, or when two versions
    disagree.
    """
    if filename:
        latest = Path(model_dir) / str(max(versions)) / filename if versions else None
        backend = backend_for_filename(filename, latest)
        if backend is None:
            known = ", ".join(f"{fmt.suffix} ({fmt.name})" for fmt in BACKENDS.values())
            raise BackendInferenceError(
                f"cannot tell the backend from default_model_filename {filename!r}: its extension is none of "
                f"{known}; set backend"
            )
        return backend, f"default_model_filename {filename}"
    if not versions:
        raise BackendInferenceError(
            "no version folder to tell the backend from; add <model>/1/model.onnx or set backend"
        )
    found: dict[int, str] = {}
    for version in versions:
        folder = Path(model_dir) / str(version)
        present = [
            fmt.name
            for fmt in BACKENDS.values()
            if (folder / fmt.filename).is_file() and fmt.serves(folder / fmt.filename)
        ]
        if len(present) > 1:
            files = ", ".join(f"{version}/{BACKENDS[name].filename}" for name in present)
            raise BackendInferenceError(f"version {version} holds {files}: cannot tell which to serve; set backend")
        if not present:
            foreign = [f"{version}/{file} ({what})" for file, what in FOREIGN_FILES.items() if (folder / file).exists()]
            if foreign:
                raise BackendInferenceError(
                    f"{', '.join(foreign)} cannot be served by tensorwire; it serves "
                    + ", ".join(f"{fmt.filename} ({fmt.name})" for fmt in BACKENDS.values())
                )
            raise BackendInferenceError(
                f"version folder {version} holds none of "
                + ", ".join(dict.fromkeys(fmt.filename for fmt in BACKENDS.values()))
                + "; add the model file, or set backend (and default_model_filename for another file name)"
            )
        found[version] = present[0]
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        detail = ", ".join(f"{v}/{BACKENDS[b].filename}" for v, b in sorted(found.items()))
        raise BackendInferenceError(f"versions hold different model kinds ({detail}); set backend")
    latest = max(found)
    return kinds[0], f"{latest}/{BACKENDS[kinds[0]].filename}"
