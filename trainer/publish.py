"""``tensorwire publish``: put an exported model into a model repository.

The model's ``config.toml`` is written (atomically) before its new version
folder appears; the version folder is assembled under a hidden temporary name
(``.tmp-...``: not a number, so servers ignore it) and renamed into place in one
step, so a server never sees half a version.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tensorwire.repository import (
    DEFAULT_FILENAMES,
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    Padding,
    RepositoryConfigError,
    TensorSpec,
    VersionPolicy,
    available_versions,
    check_model_name,
    load_model_config,
    write_model_config,
)
from tensorwire.trainer.artifacts import INPUT_NAME, OUTPUT_NAME
from tensorwire.trainer.config import PublishOptions
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.runfolder import RunFolder, load_checkpoint, read_json

#: Hidden (not a version number), so servers ignore it.
LOCK_FILE = ".publish.lock"

#: format -> (backend, name suffix)
FORMATS = {
    "onnx": ("onnxruntime", ""),
    "int8": ("onnxruntime", "_int8"),
    "torchscript": ("torchscript", "_ts"),
    "pt2": ("torch_export", "_pt2"),
    "aoti": ("aotinductor", "_aoti"),
}


def default_name(spec: dict[str, Any], fmt: str, run: RunFolder | None = None, fit_config: dict | None = None) -> str:
    """``<dataset>_<model>`` (+ ``_int8`` / ``_ts``), e.g. ``digits_cnn_int8``. A derived run (pruned or
    distilled: its fit config has ``init_from`` or ``distill``) is named after its run folder instead, e.g.
    ``runs/digits_pruned`` -> ``digits_pruned``, so that publishing it never replaces the model it came from."""
    dataset = re.sub(r"\[.*", "", spec["dataset"]).rsplit(".", 1)[0]
    model = spec["name"].rsplit(":", 1)[-1]
    base = _safe_name(f"{dataset}_{model}")
    derived = _derivation(fit_config or {})
    if run is not None and derived:
        folder = _safe_name(run.root.resolve().name)
        base = folder if folder not in ("model", base) else f"{base}_{derived}"
    return base + FORMATS[fmt][1]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_.-") or "model"


def _derivation(fit_config: dict[str, Any]) -> str:
    """``pruned`` or ``distilled`` for a run that ``prune`` or ``distill`` made, else ``""``."""
    if fit_config.get("distill"):
        return "distilled"
    return "pruned" if fit_config.get("init_from") else ""


def portable_checkpoint_path(checkpoint: Path, repo: Path) -> str:
    """Where ``checkpoint`` is, for a model's metadata, without the host's absolute paths (they say nothing
    to a client and tell anyone who can read the config how the host is laid out): relative to the
    repository when it lies inside it (``.build/digits/best.pt``), else ``<run folder>/<file>``."""
    checkpoint, repo = checkpoint.resolve(), repo.resolve()
    if checkpoint.is_relative_to(repo):
        return checkpoint.relative_to(repo).as_posix()
    return f"{checkpoint.parent.name}/{checkpoint.name}"


def _artifact(run: RunFolder, fmt: str) -> Path:
    path = {
        "onnx": run.onnx,
        "int8": run.int8,
        "torchscript": run.torchscript,
        "pt2": run.pt2,
        "aoti": run.aoti,
    }[fmt]
    if not path.is_file():
        step = "quantize" if fmt == "int8" else "export"
        raise TrainerError(f"{path}: missing (run 'tensorwire {step} --run {run.root}' first)")
    return path


class AccuracyGateError(TrainerError):
    """An INT8 model lost more accuracy than ``--max-accuracy-drop`` allows; it was not published.

    ``summary`` says by how much, without the advice the full message adds.
    """

    def __init__(self, summary: str) -> None:
        super().__init__(f"{summary}; not published (pass --force to publish anyway)")
        self.summary = summary


def _accuracy_metadata(run: RunFolder, fmt: str, opts: PublishOptions) -> dict[str, str]:
    """The accuracy report for ``[metadata]``.

    Raises:
        AccuracyGateError: for an INT8 model whose test accuracy dropped more than
            ``opts.max_accuracy_drop`` points below FP32 (unless ``opts.force``).
    """
    if fmt == "int8":
        report = read_json(run.quantize_report, "written by 'tensorwire quantize'")
        drop = float(report["accuracy_drop_points"])
        if drop > opts.max_accuracy_drop and not opts.force:
            raise AccuracyGateError(
                f"INT8 accuracy dropped {drop:.2f} points (FP32 {report['fp32_accuracy']:.4f} -> INT8 "
                f"{report['int8_accuracy']:.4f} on {report['test_samples']} test samples), more than "
                f"--max-accuracy-drop {opts.max_accuracy_drop:g}"
            )
        return {
            "accuracy": f"{report['int8_accuracy']:.4f}",
            "fp32_accuracy": f"{report['fp32_accuracy']:.4f}",
            "int8_accuracy": f"{report['int8_accuracy']:.4f}",
            "accuracy_drop_points": f"{drop:.2f}",
            "top1_agreement": f"{report['top1_agreement']:.4f}",
            "quantization": f"{report['mode']} int8, per_channel={str(report['per_channel']).lower()}, "
            f"reduce_range={str(report.get('reduce_range', False)).lower()}",
            "test_samples": str(report["test_samples"]),
        }
    report = read_json(run.export_report, "written by 'tensorwire export'")
    part = report.get(fmt)
    if part is None:
        raise TrainerError(f"{run.export_report}: has no {fmt} export (run 'tensorwire export --formats {fmt}')")
    diffs = part["max_abs_diff"]
    return {
        "accuracy": f"{part['accuracy']:.4f}",
        "eager_accuracy": f"{report['eager_accuracy']:.4f}",
        "export_max_abs_diff": f"{max(diffs.values()):.3g} (batches {','.join(diffs)})",
        "test_samples": str(report["test_samples"]),
    }


def input_spec(spec: dict[str, Any]) -> TensorSpec:
    """INPUT0 as the model takes it: FP32 features, or INT64 token ids of any length (0 = padding, masked by
    the model, so the server may pad requests of different lengths into one batch)."""
    if spec.get("input_dtype") == "int64":
        return TensorSpec(name=INPUT_NAME, datatype="INT64", dims=[-1], padding=Padding(value=0))
    return TensorSpec(name=INPUT_NAME, datatype="FP32", dims=list(spec["input_shape"]))


def build_config(
    spec: dict[str, Any],
    backend: str,
    opts: PublishOptions,
    metadata: dict[str, str],
    policy: VersionPolicy | None = None,
) -> ModelConfigFile:
    preferred = sorted({size for size in opts.preferred_batch_sizes if 0 < size <= opts.max_batch_size})
    try:
        return ModelConfigFile(
            backend=backend,
            max_batch_size=opts.max_batch_size,
            version_policy=policy or VersionPolicy(latest=1),
            inputs=[input_spec(spec)],
            outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", dims=[spec["num_classes"]])],
            dynamic_batching=DynamicBatching(
                max_queue_delay_us=opts.max_queue_delay_us, preferred_batch_sizes=preferred
            ),
            instance_group=[InstanceGroup(kind=opts.instance_kind, count=opts.instances)],
            metadata=metadata,
        )
    except ValueError as err:  # pydantic: name the first problem in one line
        first = str(err).splitlines()
        raise TrainerError(f"invalid model config: {first[2].strip() if len(first) > 2 else first[0]}") from None


#: What a re-publish keeps from an existing config.toml: how the model is served, which its owner may have
#: tuned by hand. Signature, backend and metadata describe the new artifact and are written anew.
SERVING_SETTINGS = (
    "max_batch_size",
    "version_policy",
    "dynamic_batching",
    "instance_group",
    "warmup",
    "execution_timeout_s",
)


def _existing_config(model_dir: Path) -> ModelConfigFile | None:
    """The model's current config.toml, or None when there is none or it does not load (then rewritten)."""
    try:
        return load_model_config(model_dir) if (model_dir / "config.toml").exists() else None
    except RepositoryConfigError:
        return None


#: publish option -> the config.toml setting it writes (an option given on the command line replaces it)
OPTION_SETTINGS = {
    "max_batch_size": "max_batch_size",
    "max_queue_delay_us": "dynamic_batching",
    "preferred_batch_sizes": "dynamic_batching",
    "instances": "instance_group",
    "instance_kind": "instance_group",
}


def keep_serving_settings(
    new: ModelConfigFile, existing: ModelConfigFile | None, explicit: set[str] | frozenset[str] = frozenset()
) -> ModelConfigFile:
    """``new`` with ``existing``'s serving settings (:data:`SERVING_SETTINGS`) and the metadata keys that
    ``new`` does not write (a user's own notes); ``new`` itself without an existing config. A setting whose
    publish option is in ``explicit`` (given on the command line, see :data:`OPTION_SETTINGS`) is ``new``'s."""
    if existing is None:
        return new
    replaced = {OPTION_SETTINGS[name] for name in explicit if name in OPTION_SETTINGS}
    kept = {field: getattr(existing, field) for field in SERVING_SETTINGS if field not in replaced}
    merged = {**dict(new), **kept, "metadata": {**existing.metadata, **new.metadata}}
    try:
        return ModelConfigFile.model_validate(merged)
    except ValueError as err:  # e.g. a kept preferred batch size above a new --max-batch-size
        first = str(err).splitlines()
        problem = first[2].strip() if len(first) > 2 else first[0]
        raise TrainerError(f"the existing config.toml's settings do not fit the new ones: {problem}") from None


@contextlib.contextmanager
def _publish_lock(model_dir: Path) -> Iterator[None]:
    """One publisher per model at a time (also across processes): config.toml is rewritten on
    every publish through a fixed temporary name, and the next version number is read then taken."""
    model_dir.mkdir(parents=True, exist_ok=True)
    with open(model_dir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install_version(model_dir: Path, artifact: Path, filename: str, version: int = 0) -> int:
    """Copy ``artifact`` into ``model_dir/<version>/filename`` atomically; returns the version.

    With ``version == 0`` the next free number is taken; if another publisher
    takes it first, the rename fails and the next one is tried.
    """
    tmp = model_dir / f".tmp-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir(parents=True)
    try:
        shutil.copyfile(artifact, tmp / filename)
        _fsync(tmp / filename)
        _fsync(tmp)
        candidate = version or (max(available_versions(model_dir), default=0) + 1)
        while True:
            target = model_dir / str(candidate)
            if target.exists():
                if version:
                    raise TrainerError(f"{target}: version {version} already exists (omit --version for the next one)")
                candidate += 1
                continue
            try:
                os.rename(tmp, target)  # atomic; fails if a concurrent publisher created it meanwhile
            except OSError:
                if version or not target.exists():
                    raise
                continue
            _fsync(model_dir)
            return candidate
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(
    opts: PublishOptions, fmt: str | None = None, name: str | None = None, explicit: set[str] | None = None
) -> dict[str, Any]:
    """Publish one artifact of the run; returns where it went. An existing config.toml keeps its serving
    settings except those whose options are in ``explicit`` (the options given on the command line)."""
    fmt = fmt or opts.format
    run = RunFolder.at(opts.run)
    if opts.max_batch_size < 0 or opts.instances < 1 or opts.version < 0:
        raise TrainerError("--max-batch-size must be >= 0, --instances >= 1 and --version >= 1")
    state = load_checkpoint(run.best)
    spec = state["model_spec"]
    backend = FORMATS[fmt][0]
    artifact = _artifact(run, fmt)
    metadata = {
        **_accuracy_metadata(run, fmt, opts),
        "format": fmt,
        "model": spec["name"],
        "dataset": spec["dataset"],
        "labels": ",".join(spec.get("label_names") or [str(i) for i in range(spec["num_classes"])]),
        "source_checkpoint": portable_checkpoint_path(run.best, Path(opts.repo)),
        "checkpoint_epoch": str(state["epoch"]),
        "val_accuracy": f"{state['metrics']['val_accuracy']:.4f}",
        "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(),
        "trained_with": f"torch {state['torch_version']}",
        "published_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if spec["dataset"] == "digits":
        metadata["input"] = "8x8 grey image, pixel values 0..16 divided by 16 (range 0..1)"
    if spec.get("input_dtype") == "int64":
        metadata["input"] = "token ids of any length, right-padded with 0 (text: the run's export/tokenizer.json)"
    model_name = name or opts.name or default_name(spec, fmt, run, state.get("config"))
    try:
        check_model_name(model_name)
    except RepositoryConfigError as err:
        raise TrainerError(str(err)) from None
    model_dir = Path(opts.repo) / model_name
    with _publish_lock(model_dir):
        existing = _existing_config(model_dir)
        config = keep_serving_settings(build_config(spec, backend, opts, metadata), existing, explicit or set())
        write_model_config(config, model_dir)
        version = install_version(model_dir, artifact, DEFAULT_FILENAMES[backend], opts.version)
    return {
        "name": model_name,
        "version": version,
        "path": str(model_dir / str(version)),
        "backend": backend,
        "accuracy": metadata["accuracy"],
        "kept_settings": existing is not None,
        "max_batch_size": config.max_batch_size,
    }
