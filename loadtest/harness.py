"""The benchmark harness: named scenarios, the models they need, the servers they start.

A scenario measures one thing and writes one section of BENCHMARKS.md. It is two functions and a
name, registered in :mod:`tensorwire.loadtest.scenarios` (the order there is the order of the file):

    def measure(ctx: Context) -> dict:                 # numbers, JSON-able; raise Skipped(why) if it cannot run
        repo = ctx.repo("mine", ["identity"])           # a repository holding just these models
        with ctx.server(repo, TENSORWIRE.with_args("--workers", "2")) as server:
            row = ctx.perf_analyzer(PerfAnalyzerRun("identity", 64, streaming=True), server)
        return {"rows": [row]}

    def render(result: dict, page: Page) -> str:       # markdown from those numbers (no measuring)
        return report.markdown_table(result["rows"], COLUMNS)

    register(Scenario("mine", "What it measures, in words", measure, render, needs=("perf_analyzer",)))

Building blocks for ``measure``: :meth:`Context.repo` (reference models, the digits models, the INT8
CNN, built once into the work folder and linked into a repository per scenario), :meth:`Context.server`
with a :class:`ServerSpec` (tensorwire with any extra options, or the bare baseline server),
:meth:`Context.perf_analyzer` (Triton's perf_analyzer over gRPC or HTTP, unary or streaming, one or
several processes: :class:`~tensorwire.loadtest.perf_analyzer.PerfAnalyzerRun`), the closed loop of
``tensorwire bench`` (:func:`Context.sweep`), the in-process ceiling
(:func:`tensorwire.loadtest.ceiling.measure_ceiling`), and :func:`command_scenario` for a section that a
``python -m`` command prints as markdown (the trainer's tables). ``ctx.quick`` asks for a smoke run: a
scenario then measures less and for a short time, and its section says it is not for numbers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tensorwire.loadtest import perf_analyzer as pa
from tensorwire.loadtest.launch import ServerProcess, serve
from tensorwire.loadtest.reference_models import link_or_copy

#: reference models built by tensorwire.loadtest.reference_models (each also as a <name>_nobatch twin)
REFERENCE = ("identity", "cnn", "wide_mlp")
#: the default repository's models, trained by ``tensorwire build-default-repo`` (also with _nobatch twins)
DIGITS = ("digits_cnn", "digits_cnn_int8")
#: static INT8 copy of the reference CNN (quantized here, calibrated on samples like the perf inputs)
CNN_INT8 = "cnn_int8"
NOBATCH = "_nobatch"
CALIBRATION_SAMPLES = 100
CALIBRATION_SEED = 1  # the perf input files use seed 0: calibrate on other samples of the same distribution


class Skipped(Exception):
    """Raised by a scenario that cannot run here (a tool missing); the message says why."""


@dataclass(frozen=True)
class ServerSpec:
    """A server under test: ``kind`` ``tensorwire`` or ``bare`` (the baseline), with extra options.

    ``http`` also opens an HTTP front-end (``--http-port``) for perf_analyzer's ``-i http``.
    """

    label: str
    kind: str = "tensorwire"
    args: tuple[str, ...] = ()
    http: bool = False

    def with_args(self, *args: str, label: str | None = None) -> ServerSpec:
        """The same server with more command-line options (``--workers 2``), labelled by them by default."""
        return replace(self, args=(*self.args, *args), label=label or " ".join([self.label, *args]))


#: tensorwire as users run it, quiet and without the drain wait at shutdown
TENSORWIRE = ServerSpec("tensorwire", args=("--drain-seconds", "0", "--log-level", "WARNING"))
#: loadtest/bare_server.py: one ORT call per request on the event loop, no batching
BARE = ServerSpec("bare grpc.aio server", kind="bare")


@dataclass
class Page:
    """Where the markdown goes: ``out`` is BENCHMARKS.md; figures sit beside it."""

    out: Path

    def asset(self, suffix: str) -> Path:
        """A file beside the markdown: ``BENCHMARKS.png`` for ``.png``."""
        return self.out.with_suffix(suffix)

    def link(self, path: Path) -> str:
        """``path`` relative to the markdown, for a link in it."""
        return os.path.relpath(path, self.out.parent)


@dataclass
class Context:
    """What a scenario's ``measure`` works with: the work folder (models, logs, raw files), quick or full."""

    workdir: Path
    quick: bool = False
    progress: str = "plain"
    log: Callable[[str], None] = field(default=lambda text: print(f"benchmarks: {text}", file=sys.stderr, flush=True))
    scenario: str = ""

    @property
    def store(self) -> Path:
        """Every built model, once: ``<workdir>/models``."""
        return self.workdir / "models"

    def out_dir(self) -> Path:
        """This scenario's folder for logs and raw reports: ``<workdir>/<scenario>``."""
        path = self.workdir / (self.scenario or "misc")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pick(self, full: Any, quick: Any) -> Any:
        """``quick`` in a smoke run, ``full`` otherwise."""
        return quick if self.quick else full

    # ------------------------------------------------------------------ models

    def perf_inputs(self, model: str) -> Path:
        """perf_analyzer's ``--input-data`` file for a built reference model (finite, seeded samples; the INT8
        CNN and the no-batching twins use their source model's)."""
        name = model.removesuffix(NOBATCH)
        return self.workdir / "perf_inputs" / f"{'cnn' if name == CNN_INT8 else name}.json"

    def repo(self, tag: str, models: Sequence[str]) -> Path:
        """A repository ``<workdir>/repos/<tag>`` holding exactly ``models`` (names may end in ``_nobatch``),
        built into the store first where missing; model files are hard links into the store.

        Raises RuntimeError when a model could not be built (use :meth:`build` first to leave such out).
        """
        failed = self.build([m.removesuffix(NOBATCH) for m in models])
        if failed:
            raise RuntimeError("; ".join(f"{m}: {why}" for m, why in failed.items()))
        repo = self.workdir / "repos" / tag
        shutil.rmtree(repo, ignore_errors=True)
        for name in models:
            source = self.store / name
            for path in source.rglob("*"):
                if path.is_file():
                    link_or_copy(path, repo / name / path.relative_to(source))
        return repo

    def build(self, models: Sequence[str]) -> dict[str, str]:
        """Build what is missing from the store: reference models, digits models, the INT8 CNN.

        Returns ``{model: why}`` for the models that could not be built (a digits model that
        ``tensorwire build-default-repo`` did not publish); raises ValueError for an unknown name.
        """
        missing = [m for m in dict.fromkeys(models) if not _built(self.store, m)]
        known = {*REFERENCE, *DIGITS, CNN_INT8}
        if set(missing) - known:
            raise ValueError(f"unknown models {sorted(set(missing) - known)}; known: {sorted(known)}")
        if CNN_INT8 in missing and not _built(self.store, "cnn"):
            missing.insert(0, "cnn")
        reference = [m for m in missing if m in REFERENCE]
        if reference:
            from tensorwire.loadtest.reference_models import build_repository

            self.log(f"building reference models {reference}")
            build_repository(self.store, models=reference, inputs_dir=self.workdir / "perf_inputs", log=self.log)
        failed = self._build_digits() if any(m in DIGITS for m in missing) else {}
        if CNN_INT8 in missing:
            self._build_cnn_int8()
        return {m: why for m, why in failed.items() if m in models}

    def _build_digits(self) -> dict[str, str]:
        """Train and publish the default repository's models; ``{model: why}`` for those not published."""
        digits_repo = self.workdir / "digits_repo"
        self.log("training and publishing the digits models (tensorwire build-default-repo, ~30 s)")
        log_path = self.workdir / "build-default-repo.log"
        with open(log_path, "wb") as out:
            command = [sys.executable, "-m", "tensorwire.cli", "build-default-repo", "--repo", str(digits_repo)]
            done = subprocess.run([*command, "--no-progress"], stdout=out, stderr=subprocess.STDOUT)
        from tensorwire.loadtest.ceiling import latest_model_file

        failed = {}
        for name in DIGITS:
            if not (digits_repo / name / "config.toml").is_file():
                failed[name] = (
                    f"tensorwire build-default-repo did not publish it (exit {done.returncode}); see {log_path}"
                )
                continue
            model_file, _ = latest_model_file(digits_repo, name)
            shutil.rmtree(self.store / name, ignore_errors=True)
            link_or_copy(digits_repo / name / "config.toml", self.store / name / "config.toml")
            link_or_copy(model_file, self.store / name / model_file.parent.name / model_file.name)
            _nobatch_twin(self.store, name)
        return failed

    def _build_cnn_int8(self) -> None:
        from tensorwire.loadtest.reference_models import sample_inputs
        from tensorwire.repository import load_model_config, write_model_config
        from tensorwire.trainer.quantize import quantize_static

        fp32 = self.store / "cnn" / "1" / "model.onnx"
        int8 = self.store / CNN_INT8 / "1" / "model.onnx"
        int8.parent.mkdir(parents=True, exist_ok=True)
        self.log(f"quantizing cnn -> {CNN_INT8} (static QDQ, per-channel, {CALIBRATION_SAMPLES} samples)")
        quantize_static(fp32, int8, sample_inputs("cnn", CALIBRATION_SAMPLES, CALIBRATION_SEED), per_channel=True)
        config = load_model_config(self.store / "cnn")
        metadata = {
            **config.metadata,
            "description": "static INT8 (QDQ, per-channel) copy of the 'cnn' model",
            "quantization": f"onnxruntime quantize_static, MinMax on {CALIBRATION_SAMPLES} samples "
            f"(seed {CALIBRATION_SEED})",
        }
        write_model_config(config.model_copy(update={"metadata": metadata}), self.store / CNN_INT8)

    # ------------------------------------------------------------------ running things

    @contextlib.contextmanager
    def server(self, repo: Path, spec: ServerSpec = TENSORWIRE, models: Sequence[str] = ()) -> Iterator[ServerProcess]:
        """``spec``'s server for ``repo`` on loopback, ready (and every one of ``models`` ready), its log in
        :meth:`out_dir`; stopped when the block ends."""
        self.log(f"starting {spec.label} for {', '.join(models) or repo.name}")
        with serve(
            repo,
            *spec.args,
            kind=spec.kind,
            http=spec.http,
            metrics=False,
            models=models,
            ready_timeout=900,
            log_dir=self.out_dir(),
        ) as server:
            yield server

    def require_perf_analyzer(self) -> None:
        """Raise :class:`Skipped` when perf_analyzer cannot be set up here."""
        why = pa.setup()
        if why is not None:
            raise Skipped(f"perf_analyzer could not be set up: {why}")

    def perf_analyzer(self, spec: pa.PerfAnalyzerRun, server: ServerProcess, tag: str = "") -> dict[str, Any]:
        """One perf_analyzer measurement (see :func:`tensorwire.loadtest.perf_analyzer.run`), logged."""
        row = pa.run(spec, server, self.perf_inputs(spec.model), self.out_dir() / "perf_analyzer", tag=tag)
        what = f"{spec.model} {spec.mode} c={spec.concurrency}" + (f"×{spec.processes}" if spec.processes > 1 else "")
        if "error" in row:
            self.log(f"  {server.kind} {what}: FAILED: {row['error']}")
        else:
            self.log(
                f"  {server.kind} {what}: {row['throughput_rps']:,.0f} infer/s, p50 "
                f"{row['latency_p50_ms']:.2f} ms, server {_f(row['server_cpu_us_per_request'])} µs/request"
            )
        return row

    def sweep(
        self,
        server: ServerProcess,
        model: str,
        *,
        label: str,
        concurrency: Sequence[int],
        modes: Sequence[str] = ("async",),
        timing: dict[str, float] | None = None,
        ceiling: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """``tensorwire bench``'s closed loop against ``server``: one row per (mode, level), labelled ``label``,
        with efficiency against ``ceiling`` rows when given. ``timing``: warmup_s, window_s, stable_windows,
        max_windows, stability_pct (the bench defaults otherwise)."""
        from tensorwire.loadtest.bench import BenchSettings, Sweep, make_display
        from tensorwire.loadtest.ceiling import attach_efficiency

        settings = BenchSettings(
            address=server.address,
            model=model,
            concurrency=list(concurrency),
            modes=modes,
            server_pid=server.pid,
            label=label,
            **(timing or {}),
        )
        display = make_display(self.progress)
        sweep = Sweep(settings, display)
        try:
            sweep.prepare()
            levels = sweep.run()
            attach_efficiency(levels, ceiling or [], sweep.max_batch_size or 0, bool(sweep.batching))
        finally:
            sweep.close()
            display.close()
        return levels


@dataclass(frozen=True)
class Scenario:
    """A named measurement and the section of BENCHMARKS.md it writes.

    ``measure(ctx)`` returns JSON-able numbers (or raises :class:`Skipped`); ``render(result, page)``
    turns them into markdown without measuring. ``needs`` names outside tools (for ``--list``);
    ``minutes`` is the rough length of a full run on 2 cores.
    """

    name: str
    title: str
    measure: Callable[[Context], dict[str, Any]]
    render: Callable[[dict[str, Any], Page], str]
    needs: tuple[str, ...] = ()
    minutes: float = 1.0


#: every registered scenario, in the order of BENCHMARKS.md
SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    """Add a scenario to :data:`SCENARIOS` (after the others); raises ValueError for a name taken."""
    if scenario.name in SCENARIOS:
        raise ValueError(f"a scenario named {scenario.name!r} exists already")
    SCENARIOS[scenario.name] = scenario
    return scenario


def command_scenario(
    name: str,
    title: str,
    module: str,
    args: Sequence[str] = (),
    quick_args: Sequence[str] = (),
    needs: tuple[str, ...] = (),
    minutes: float = 1.0,
) -> Scenario:
    """A scenario whose section is what ``python -m <module> <args>`` prints (markdown), e.g. a trainer table.

    Skipped, saying so, when the module is not installed; a failing command is an error with its output.
    """

    def measure(ctx: Context) -> dict[str, Any]:
        if importlib.util.find_spec(module) is None:
            raise Skipped(f"{module} is not part of this installation")
        command = [sys.executable, "-m", module, *(quick_args if ctx.quick else args)]
        log_path = ctx.out_dir() / f"{module.rsplit('.', 1)[-1]}.log"
        ctx.log(f"$ python -m {module} {' '.join(command[3:])}")
        done = subprocess.run(command, capture_output=True, text=True)
        log_path.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(
                f"python -m {module} exited {done.returncode}; see {log_path}:\n{(done.stdout + done.stderr)[-1500:]}"
            )
        return {"command": " ".join(["python", *command[1:]]), "markdown": done.stdout.strip()}

    def render(result: dict[str, Any], page: Page) -> str:
        return f"Command: `{result['command']}`\n\n{result['markdown']}"

    return Scenario(name, title, measure, render, needs=needs, minutes=minutes)


# --------------------------------------------------------------------------- helpers


def _f(value: Any, pattern: str = "{:,.0f}") -> str:
    return "–" if value is None else pattern.format(value)


def _built(store: Path, model: str) -> bool:
    names = [model] if model == CNN_INT8 else [model, model + NOBATCH]
    return all((store / name / "config.toml").is_file() for name in names)


def _nobatch_twin(store: Path, name: str) -> None:
    """``<name>_nobatch``: the same model file (hard link) with dynamic batching off."""
    from tensorwire.loadtest.ceiling import latest_model_file
    from tensorwire.repository import write_model_config

    model_file, config = latest_model_file(store, name)
    twin = store / (name + NOBATCH)
    off = config.model_copy(
        update={
            "dynamic_batching": config.dynamic_batching.model_copy(
                update={"enabled": False, "preferred_batch_sizes": []}
            )
        }
    )
    write_model_config(off, twin)
    link_or_copy(model_file, twin / model_file.parent.name / model_file.name)
