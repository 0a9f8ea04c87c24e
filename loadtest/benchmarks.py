"""Regenerate BENCHMARKS.md with one command.

    python -m tensorwire.loadtest.benchmarks --out BENCHMARKS.md

What it does, in order (about 8 minutes on a 2-core machine):

1. waits (up to ``--wait-idle`` seconds) for the 1-minute load average to fall below ``--max-load``, and
   records it either way: client and server share this machine's cores, so other work skews everything;
2. builds the reference models into ``--workdir`` (default ``.cache/benchmarks``; reused when present):
   ``identity``, ``cnn`` (3×32×32 ResNet-style) and ``wide_mlp`` (512→4096→4096→512) from
   :mod:`tensorwire.loadtest.reference_models`, and the digits CNN FP32 and INT8 from
   ``tensorwire build-default-repo`` (trained here with 2 DDP processes); each also as a
   ``<name>_nobatch`` twin with dynamic batching off;
3. starts one ``tensorwire serve`` for all of them on a free loopback port;
4. per model: the in-process ONNX Runtime ceiling at batch 1..64, then the closed-loop sweep
   (``tensorwire bench``'s engine) at concurrency 1, 8, 32, 64 with batching on and off; for identity
   also over one ``ModelStreamInfer`` stream;
5. locust: 64 users against identity (``loadtest/locustfile.py``, headless), beside the closed loop;
6. Triton's perf_analyzer against identity at concurrency 64 (``--no-perf-analyzer`` to skip) and a
   py-spy profile of the server under load (``--no-profile`` to skip);
7. writes the markdown (``--out``), a PNG of every sweep (``<out>.png`` unless ``--plot``) and the raw
   numbers as JSON (``<out>.json`` unless ``--json``), with the hand-written analysis in
   ``loadtest/benchmarks_notes.md`` (``--notes FILE``) under "Where the time goes".

``--from-json FILE`` re-renders the markdown and plot from an earlier run without measuring.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tensorwire.loadtest import _stats, report
from tensorwire.loadtest.bench import (
    BenchSettings,
    Sweep,
    attach_efficiency,
    latest_model_file,
    local_server,
    make_display,
    measure_model_ceiling,
)

MODELS = ("identity", "cnn", "wide_mlp", "digits_cnn", "digits_cnn_int8")
REFERENCE = ("identity", "cnn", "wide_mlp")
DIGITS = ("digits_cnn", "digits_cnn_int8")
NOBATCH = "_nobatch"
CEILING_SIZES = (1, 2, 4, 8, 16, 32, 64)
DESCRIPTIONS = {
    "identity": "FP32 [16] → Identity: no compute at all, pure serving overhead",
    "cnn": "FP32 [3, 32, 32] → 10, ResNet-style (16/32/64 channels, 7 basic blocks), 63 MFLOPs/sample",
    "wide_mlp": "FP32 [512] → 4096 → 4096 → [512], 21 M parameters (84 MB): weight-bandwidth-bound "
                "at batch 1",
    "digits_cnn": "FP32 [1, 8, 8] → 10, the default repository's digits CNN (trained here)",
    "digits_cnn_int8": "the same digits CNN, static INT8 (QDQ, per-channel) with ONNX Runtime",
}
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PERF_ANALYZER = Path(__file__).with_name("perf_analyzer.sh")
DEFAULT_NOTES = Path(__file__).with_name("benchmarks_notes.md")


def log(text: str) -> None:
    print(f"benchmarks: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- preparing


def wait_for_quiet(max_load: float, wait_s: float) -> tuple[float | None, float]:
    """Wait until the 1-minute load average is below ``max_load`` (at most ``wait_s``); (load, waited s)."""
    started = time.monotonic()
    load = _stats.load_average()
    while load is not None and load >= max_load and time.monotonic() - started < wait_s:
        log(f"load average {load:.2f} >= {max_load}: waiting for other work to finish "
            f"({wait_s - (time.monotonic() - started):.0f} s left)")
        time.sleep(min(30.0, max(1.0, wait_s - (time.monotonic() - started))))
        load = _stats.load_average()
    return load, time.monotonic() - started


def nobatch_twin(repo: Path, name: str) -> None:
    """``<name>_nobatch``: the same model file (hard link) with dynamic batching off."""
    from tensorwire.repository import write_model_config

    model_file, config = latest_model_file(repo, name)
    twin = repo / (name + NOBATCH)
    off = config.model_copy(update={"dynamic_batching": config.dynamic_batching.model_copy(
        update={"enabled": False, "preferred_batch_sizes": []})})
    write_model_config(off, twin)
    target = twin / model_file.parent.name / model_file.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(model_file, target)
    except OSError:
        shutil.copyfile(model_file, target)


def build_models(workdir: Path, models: Sequence[str]) -> tuple[Path, dict[str, str]]:
    """The benchmark repository under ``workdir``; returns (repo, {model: why it was skipped})."""
    from tensorwire.loadtest.reference_models import build_repository

    repo = workdir / "models"
    skipped: dict[str, str] = {}
    present = lambda name: (repo / name / "config.toml").is_file() and (  # noqa: E731
        repo / (name + NOBATCH) / "config.toml").is_file()
    reference = [m for m in models if m in REFERENCE and not present(m)]
    if reference:
        log(f"building reference models {reference}")
        build_repository(repo, models=reference, inputs_dir=workdir / "perf_inputs", log=log)
    digits = [m for m in models if m in DIGITS and not present(m)]
    if digits:
        digits_repo = workdir / "digits_repo"
        log("training and publishing the digits models (tensorwire build-default-repo, ~30 s)")
        build_log = workdir / "build-default-repo.log"
        with open(build_log, "wb") as out:
            done = subprocess.run(
                [sys.executable, "-m", "tensorwire.cli", "build-default-repo", "--repo", str(digits_repo),
                 "--no-progress"], stdout=out, stderr=subprocess.STDOUT,
            )
        for name in digits:
            source = digits_repo / name
            if done.returncode != 0 or not (source / "config.toml").is_file():
                skipped[name] = (f"tensorwire build-default-repo failed (exit {done.returncode}); "
                                 f"see {build_log}")
                continue
            model_file, _ = latest_model_file(digits_repo, name)
            shutil.rmtree(repo / name, ignore_errors=True)
            (repo / name / model_file.parent.name).mkdir(parents=True)
            shutil.copy2(source / "config.toml", repo / name / "config.toml")
            shutil.copy2(model_file, repo / name / model_file.parent.name / model_file.name)
            nobatch_twin(repo, name)
    return repo, skipped


# --------------------------------------------------------------------------- measuring


def run_locust(address: str, model: str, users: int, seconds: int, workdir: Path) -> dict[str, Any]:
    """locust headless against ``model``; the locustfile's --summary-json totals."""
    summary = workdir / "locust-summary.json"
    summary.unlink(missing_ok=True)
    command = [
        str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
        "-r", str(users), "-t", f"{seconds}s", "--host", address, "--model", model,
        "--summary-json", str(summary), "--only-summary", "--loglevel", "WARNING",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, env=env, cwd=workdir)
    if not summary.exists():
        return {"error": f"locust exited {done.returncode}: {done.stderr.strip()[-500:]}"}
    result = json.loads(summary.read_text())
    result["command"] = (f"locust -f loadtest/locustfile.py --headless -u {users} -r {users} "
                         f"-t {seconds}s --host {address} --model {model}")
    return result


def run_perf_analyzer(address: str, model: str, concurrency: int, inputs: Path, workdir: Path
                      ) -> dict[str, Any]:
    """Triton's perf_analyzer (async gRPC, one concurrency level); its CSV row."""
    setup = subprocess.run([str(PERF_ANALYZER), "--setup-only"], capture_output=True, text=True, timeout=300)
    if setup.returncode != 0:
        return {"error": "perf_analyzer is not available: " + setup.stderr.strip()[-300:]}
    out = workdir / "perf_analyzer.csv"
    args = ["-m", model, "-u", address, "-i", "grpc", "--async", "--concurrency-range", str(concurrency),
            "--input-data", str(inputs), "--measurement-interval", "2000", "--stability-percentage", "30",
            "--max-trials", "8", "-f", str(out)]
    done = subprocess.run([str(PERF_ANALYZER), *args], capture_output=True, text=True, timeout=240)
    if done.returncode != 0 or not out.exists():
        said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        why = next((line for line in said if "Failed" in line or "rror" in line), said[-1] if said else "")
        return {"error": f"perf_analyzer exited {done.returncode}: {why}"}
    row = next(csv.DictReader(out.open()))
    return {
        "command": "loadtest/perf_analyzer.sh " + " ".join(args[:-2]),
        "concurrency": concurrency,
        "throughput_rps": float(row["Inferences/Second"]),
        "latency_p50_ms": float(row["p50 latency"]) / 1e3,
        "latency_p99_ms": float(row["p99 latency"]) / 1e3,
        "server_queue_us": float(row["Server Queue"]),
        "server_compute_us": float(row["Server Compute Input"]) + float(row["Server Compute Infer"])
        + float(row["Server Compute Output"]),
    }


def summarize_profile(raw: str, top: int = 15) -> tuple[int, list[dict[str, Any]]]:
    """py-spy's collapsed stacks -> (samples, the functions most often on top of the stack).

    Line numbers are dropped, so a function's lines add up. With ``--gil`` every sample is a moment
    when some thread held the GIL: the list says what the GIL was busy with.
    """
    own: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = re.sub(r":\d+\)$", ")", stack.split(";")[-1])
        total += int(count)
        own[leaf] += int(count)
    return total, [{"function": name, "samples": n, "share": n / total} for name, n in own.most_common(top)]


PROFILE_RATE = 250


def profile_server(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    """``py-spy record`` on the server: samples only while a thread holds the GIL, non-blocking."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return None
    return subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(PROFILE_RATE),
         "--format", "raw", "--gil", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def run_sweep(address: str, pid: int, name: str, label: str, model_group: str, args: argparse.Namespace,
              ceiling: list[dict[str, Any]], modes: Sequence[str] = ("async",),
              concurrency: Sequence[int] | None = None) -> list[dict[str, Any]]:
    settings = BenchSettings(
        address=address, model=name, concurrency=concurrency or args.concurrency, modes=modes,
        warmup_s=args.warmup, window_s=args.window, stable_windows=args.stable_windows,
        max_windows=args.max_windows, stability_pct=args.stability, server_pid=pid, label=label,
    )
    display = make_display(args.progress)
    sweep = Sweep(settings, display)
    try:
        sweep.prepare()
        levels = sweep.run()
        attach_efficiency(levels, ceiling, sweep.max_batch_size or 0, bool(sweep.batching))
    finally:
        sweep.close()
        display.close()
    for level in levels:
        level["model_group"] = model_group
    return levels


def measure(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    load, waited = wait_for_quiet(args.max_load, args.wait_idle)
    started = time.time()
    document: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "machine": report.machine(),
        "load_average_start": load,
        "waited_for_quiet_s": waited,
        "settings": {k: v for k, v in vars(args).items() if k in (
            "concurrency", "mode", "warmup", "window", "stable_windows", "max_windows", "stability",
            "ceiling_seconds", "ceiling_repeats", "locust_users", "locust_seconds")},
        "models": {}, "skipped": {}, "levels": [], "ceilings": {},
    }
    repo, skipped = build_models(workdir, args.models)
    document["skipped"] = skipped
    models = [m for m in args.models if m not in skipped]
    document["load_average_before_serving"] = _stats.load_average()
    with local_server(repo, ready_timeout=900, log_path=workdir / "server.log") as (address, pid):
        document["server"] = {"address": address, "pid": pid, "repo": str(repo)}
        for model in models:
            model_file, config = latest_model_file(repo, model)
            group = config.instance_group[0]
            document["models"][model] = {
                "description": DESCRIPTIONS.get(model, ""),
                "file": str(model_file),
                "file_mb": model_file.stat().st_size / 1e6,
                "max_batch_size": config.max_batch_size,
                "max_queue_delay_us": config.dynamic_batching.max_queue_delay_us,
                "preferred_batch_sizes": list(config.dynamic_batching.preferred_batch_sizes),
                "instances": sum(g.count for g in config.instance_group),
                "threads": group.threads,
            }
            log(f"{model}: in-process ceiling at batch sizes {list(CEILING_SIZES)}")
            ceiling, info = measure_model_ceiling(model_file, config, CEILING_SIZES, args.ceiling_seconds,
                                                  args.ceiling_repeats)
            document["ceilings"][model] = {"rows": ceiling, **info}
            document["models"][model]["threads"] = info["threads"]
            for label, name in (("batching on", model), ("batching off", model + NOBATCH)):
                log(f"{model}: {label} ({name}), concurrency {args.concurrency}")
                document["levels"] += run_sweep(address, pid, name, label, model, args, ceiling,
                                                modes=[args.mode])
            if model == "identity" and args.mode != "stream":
                log("identity: one ModelStreamInfer stream, batching on")
                document["levels"] += run_sweep(address, pid, model, "stream, batching on", model, args,
                                                ceiling, modes=["stream"])
        if "identity" in models and args.locust_users:
            log(f"locust: {args.locust_users} users against identity for {args.locust_seconds} s")
            document["locust"] = run_locust(address, "identity", args.locust_users, args.locust_seconds,
                                            workdir)
        if "identity" in models and args.perf_analyzer:
            log("perf_analyzer: identity, async, concurrency 64")
            document["perf_analyzer"] = run_perf_analyzer(address, "identity", 64,
                                                          workdir / "perf_inputs" / "identity.json", workdir)
        if args.profile and "identity" in models:
            document["profile"] = profile_identity(address, pid, args, workdir)
    document["load_average_end"] = _stats.load_average()
    document["duration_s"] = time.time() - started
    (workdir / "last-run.json").write_text(json.dumps(document, indent=2) + "\n")
    return document


def profile_identity(address: str, pid: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """py-spy on the server while identity runs at concurrency 64 (a level of its own: py-spy costs CPU)."""
    out = workdir / "server-profile.txt"
    seconds = 8
    log(f"profile: py-spy on the server for {seconds} s, identity at concurrency 64")
    holder: dict[str, Any] = {}

    def load() -> None:
        settings = BenchSettings(address=address, model="identity", concurrency=[64], modes=[args.mode],
                                 warmup_s=0.5, window_s=seconds + 1, stable_windows=1, max_windows=1,
                                 server_pid=pid)
        sweep = Sweep(settings)
        try:
            sweep.prepare()
            holder["levels"] = sweep.run()
        finally:
            sweep.close()

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    time.sleep(1.0)
    spy = profile_server(pid, seconds, out)
    if spy is None:
        runner.join()
        return {"error": "py-spy is not installed"}
    _, err = spy.communicate(timeout=seconds + 60)
    runner.join()
    if spy.returncode != 0 or not out.exists():
        return {"error": f"py-spy exited {spy.returncode}: {err.strip()[-300:]}"}
    level = (holder.get("levels") or [{}])[0]
    samples, top = summarize_profile(out.read_text())
    return {"top": top, "samples": samples, "gil_busy": samples / (PROFILE_RATE * seconds), "file": str(out),
            "seconds": seconds, "throughput_rps": level.get("throughput_rps"),
            "server_cpu_us_per_request": level.get("server_cpu_us_per_request")}


# --------------------------------------------------------------------------- writing


def _f(value: Any, pattern: str = "{:,.0f}") -> str:
    return report.fmt(value, pattern)


def find(levels: list[dict[str, Any]], model: str, series: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in levels if r.get("model_group") == model and r["series"] == series
                 and r["concurrency"] == concurrency), None)


SWEEP_COLUMNS = [
    ("series", "variant", "{}"),
    ("concurrency", "conc.", "{}"),
    ("throughput_samples_per_s", "samples/s", "{:,.0f}"),
    ("latency_p50_ms", "p50 ms", "{:.2f}"),
    ("latency_p90_ms", "p90 ms", "{:.2f}"),
    ("latency_p99_ms", "p99 ms", "{:.2f}"),
    ("server_avg_batch", "avg batch", "{:.1f}"),
    ("server_queue_us", "queue µs", "{:,.0f}"),
    ("server_compute_us", "compute µs", "{:,.0f}"),
    ("ceiling_samples_per_s", "ceiling", "{:,.0f}"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("errors", "errors", "{}"),
    ("server_cpu_cores", "server CPU", "{:.2f}"),
    ("client_cpu_cores", "client CPU", "{:.2f}"),
    ("stable", "stable", "{}"),
]


def _machine_section(document: dict[str, Any]) -> list[str]:
    settings = document["settings"]
    load = document.get("load_average_start")
    return [
        "## Machine and method",
        "",
        f"- **Machine**: {report.machine_markdown(document['machine'])}.",
        f"- **Load average** (1 min) at the start: {_f(load, '{:.2f}')} (after waiting "
        f"{document.get('waited_for_quiet_s', 0):.0f} s for other work to finish), before serving "
        f"{_f(document.get('load_average_before_serving'), '{:.2f}')}, at the end "
        f"{_f(document.get('load_average_end'), '{:.2f}')} (the benchmark's own client and server threads "
        "count in it: about 2–3 while it runs). Client, server (and locust) share these cores: every "
        "request costs CPU on both sides, so these are end-to-end numbers for one machine, not what a "
        "server does with a load generator elsewhere.",
        f"- **Closed loop** (`tensorwire bench`, mode `{settings['mode']}`): N requests in flight, each "
        "worker sending its next request when its last one is answered; one row per request. Per level: "
        f"{settings['warmup']:g} s warm-up, then {settings['window']:g} s windows until "
        f"{settings['stable_windows']} consecutive windows agree within ±{settings['stability']:g} % "
        f"(at most {settings['max_windows']} windows); the numbers cover those last windows. Latency is "
        "the client's; avg batch, queue and compute come from the server's ModelStatistics over the same "
        "windows (avg batch = Δinference_count / Δexecution_count; compute = input + infer + output of "
        "the batch a request ran in). Server and client CPU: cores busy, from /proc.",
        "- **Ceiling**: `session.run` in a closed loop in one process, no server, same model file, same "
        "intra-op threads and sessions as the server gives the model. Efficiency = served samples/s ÷ "
        "the best ceiling among the batch sizes a level could form (≤ concurrency; 1 with batching off).",
        "- **Batching off**: the same model file served as `<name>_nobatch` with "
        "`dynamic_batching.enabled = false`, so every request runs alone.",
        f"- Total time: {document.get('duration_s', 0) / 60:.1f} min.",
    ]


def _batching_section(document: dict[str, Any], plot_name: str | None) -> list[str]:
    levels, conc = document["levels"], document["settings"]["concurrency"]
    last = conc[-1]
    lines = ["## Batching on vs off", "",
             "Samples/s with batching on / off (gain), and p99 latency at the highest concurrency.", "",
             "| model | " + " | ".join(f"c={c}" for c in conc) + f" | p99 at c={last}: on / off |",
             "|---|" + "---:|" * (len(conc) + 1)]
    for model in document["models"]:
        cells = []
        for c in conc:
            on, off = find(levels, model, "batching on", c), find(levels, model, "batching off", c)
            if not on or not off:
                cells.append("–")
                continue
            a, b = on["throughput_samples_per_s"], off["throughput_samples_per_s"]
            cells.append(f"{a:,.0f} / {b:,.0f} ({a / b:.1f}×)" if b else f"{a:,.0f} / 0")
        on, off = find(levels, model, "batching on", last), find(levels, model, "batching off", last)
        p99_on = _f(on and on["latency_p99_ms"], "{:.1f}")
        p99_off = _f(off and off["latency_p99_ms"], "{:.1f}")
        lines.append(f"| `{model}` | " + " | ".join(cells) + f" | {p99_on} / {p99_off} ms |")
    on, off = find(levels, "wide_mlp", "batching on", 64), find(levels, "wide_mlp", "batching off", 64)
    if on and off and off["throughput_samples_per_s"]:
        gain = on["throughput_samples_per_s"] / off["throughput_samples_per_s"]
        met = gain >= 5 and on["latency_p99_ms"] < off["latency_p99_ms"]
        lines += ["", "**Target** (wide MLP at concurrency 64: batching on ≥ 5× batching off, at a lower "
                      f"p99): {gain:.1f}×, p99 {on['latency_p99_ms']:.0f} vs {off['latency_p99_ms']:.0f} ms: "
                      f"{'met' if met else '**not met**'}."]
    if plot_name:
        lines += ["", f"![throughput and p99 against concurrency, per model]({plot_name})"]
    return lines


def _ceiling_section(document: dict[str, Any]) -> list[str]:
    settings, ceilings = document["settings"], document["ceilings"]
    sizes = sorted({r["batch_size"] for c in ceilings.values() for r in c["rows"]})
    lines = ["## Ceiling: ONNX Runtime alone, samples/s by batch size", "",
             "| model | threads × sessions | " + " | ".join(f"b={b}" for b in sizes) + " |",
             "|---|---|" + "---:|" * len(sizes)]
    for model, ceiling in ceilings.items():
        by_size = {r["batch_size"]: r["samples_per_s"] for r in ceiling["rows"]}
        lines.append(f"| `{model}` | {ceiling['threads']} × {ceiling['replicas']} | "
                     + " | ".join(_f(by_size.get(b)) for b in sizes) + " |")
    lines += ["", f"Each point: the median of {settings['ceiling_repeats']} windows of "
                  f"{settings['ceiling_seconds']:g} s after a warm-up "
                  "(`python -m tensorwire.loadtest.ceiling`)."]
    return lines


def _generators_section(document: dict[str, Any]) -> list[str]:
    locust, pa = document.get("locust"), document.get("perf_analyzer")
    if not locust and not pa:
        return []
    closed = find(document["levels"], "identity", "batching on", 64)
    lines = ["## The same server, other load generators (identity)", "",
             "| load generator | in flight | req/s | p50 ms | p99 ms | failures |",
             "|---|---:|---:|---:|---:|---:|"]
    if closed:
        lines.append(f"| `tensorwire bench` ({closed['mode']}) | 64 | {_f(closed['throughput_rps'])} "
                     f"| {_f(closed['latency_p50_ms'], '{:.2f}')} "
                     f"| {_f(closed['latency_p99_ms'], '{:.2f}')} | {closed['errors']} |")
    if locust and "error" not in locust:
        t = locust["total"]
        lines.append(f"| locust, {locust['users']} users, 1 process | {locust['users']} "
                     f"| {_f(t['requests_per_s'])} | {_f(t['p50_ms'], '{:.0f}')} "
                     f"| {_f(t['p99_ms'], '{:.0f}')} | {t['failures']} of {t['requests']:,} |")
    elif locust:
        lines.append(f"| locust | – | – | – | – | {locust['error']} |")
    if pa and "error" not in pa:
        lines.append(f"| Triton perf_analyzer, async gRPC | {pa['concurrency']} "
                     f"| {_f(pa['throughput_rps'])} | {_f(pa['latency_p50_ms'], '{:.2f}')} "
                     f"| {_f(pa['latency_p99_ms'], '{:.2f}')} | 0 |")
    elif pa:
        lines.append(f"| perf_analyzer | – | – | – | – | {pa['error']} |")
    lines += ["", "locust rounds its percentiles to whole milliseconds. Its users are gevent greenlets "
                  "calling the blocking SDK (made cooperative by `grpc.experimental.gevent.init_gevent()`), "
                  "all in one process that needs its own share of the cores."]
    if locust and "command" in locust:
        lines += ["", f"Command: `{locust['command']}`"]
    return lines


def _time_section(document: dict[str, Any], notes: str | None) -> list[str]:
    lines = ["## Where the time goes", ""]
    identity = find(document["levels"], "identity", "batching on", 64)
    if identity:
        lines += [
            f"identity at concurrency 64 ({identity['mode']}): {_f(identity['throughput_rps'])} req/s. "
            f"CPU per request: server {_f(identity['server_cpu_us_per_request'])} µs, client "
            f"{_f(identity['client_cpu_us_per_request'])} µs. The server's own accounting per request: "
            f"queue {_f(identity['server_queue_us'])} µs, compute {_f(identity['server_compute_us'])} µs, "
            f"whole request {_f(identity['server_request_us'])} µs; average batch "
            f"{_f(identity['server_avg_batch'], '{:.1f}')}.",
        ]
        server_us, client_us = identity["server_cpu_us_per_request"], identity["client_cpu_us_per_request"]
        cores = document["machine"]["cores"]
        if server_us and client_us:
            lines[-1] += (
                f" With no model compute at all, {cores} cores can serve at most about {cores} ÷ "
                f"({server_us:,.0f} + {client_us:,.0f}) µs ≈ "
                f"{cores / (server_us + client_us) * 1e6:,.0f} req/s "
                "with client and server sharing the machine. The server itself used "
                f"{_f(identity['server_cpu_cores'], '{:.2f}')} cores here: one event-loop thread holding the "
                "GIL plus gRPC's own threads, so moving the client elsewhere would not double it."
            )
    profile = document.get("profile")
    if profile and "top" in profile:
        lines += [
            "", f"py-spy (`record --gil --nonblocking`, {PROFILE_RATE} Hz) on the server for "
            f"{profile['seconds']} s while identity ran at concurrency 64 "
            f"({_f(profile.get('throughput_rps'))} req/s while sampled): a thread held the GIL in "
            f"**{profile['gil_busy']:.0%}** of the samples. What held it (the function on top of the stack, "
            "lines merged; `Handle._run` on top means C/Cython code called from an event-loop callback, "
            "which in this server is grpcio's asyncio binding):", "",
            "| function | share of GIL-held samples |", "|---|---:|"]
        lines += [f"| `{e['function']}` | {e['share']:.1%} |" for e in profile["top"]]
    elif profile:
        lines += ["", f"Profile: {profile['error']}"]
    if notes:
        lines += ["", notes.strip()]
    return lines


def render(document: dict[str, Any], command: str, plot_name: str | None, notes: str | None) -> str:
    levels = document["levels"]
    lines = [
        "# Benchmarks", "",
        f"<!-- generated by `{command}` ({document['started']}); change the generator "
        "(loadtest/benchmarks.py) or its notes file, not this file -->", "",
        "How fast is tensorwire, and where is the knee? Closed-loop sweeps of reference models with dynamic "
        "batching on and off, next to the in-process ONNX Runtime ceiling of the same model files.", "",
        *_machine_section(document), "",
        "## Models", "",
        "| model | what | max batch | queue delay | instances × threads |", "|---|---|---:|---:|---|",
    ]
    for name, info in document["models"].items():
        lines.append(f"| `{name}` | {info['description']} | {info['max_batch_size']} "
                     f"| {info['max_queue_delay_us']} µs | {info['instances']} × {info['threads']} |")
    lines += [f"| `{name}` | **skipped**: {why} | | | |" for name, why in document.get("skipped", {}).items()]
    lines += ["", *_batching_section(document, plot_name), "", "## Every level", ""]
    for model in document["models"]:
        rows = [r for r in levels if r.get("model_group") == model]
        lines += [f"### `{model}`", "", report.markdown_table(rows, SWEEP_COLUMNS), ""]
    lines += [*_ceiling_section(document), ""]
    generators = _generators_section(document)
    if generators:
        lines += [*generators, ""]
    lines += [*_time_section(document, notes), ""]
    repo = Path(document["server"]["repo"]) if document.get("server") else Path("models")
    lines += [
        "## Reproduce", "",
        "```bash",
        command,
        "# one model, with a server of its own, the ceiling and a plot:",
        f"tensorwire bench --repo {repo} --model cnn --concurrency 1,8,32,64 --mode async \\",
        "    --ceiling --plot cnn.png --json cnn.json",
        "# locust against a running server:",
        "locust -f loadtest/locustfile.py --headless -u 64 -r 64 -t 30s \\",
        "    --host 127.0.0.1:8001 --model identity",
        "```", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    values = [int(t) for t in text.split(",") if t.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.benchmarks",
        description="Build the reference models, serve them, measure, and write BENCHMARKS.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="markdown file to write")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers (default: <out>.json)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of every sweep (default: <out>.png)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--notes", type=Path, default=DEFAULT_NOTES,
                        help="markdown appended under 'Where the time goes' (none if the file is missing)")
    parser.add_argument("--workdir", type=Path, default=Path(".cache/benchmarks"),
                        help="models, logs and profiles go here (reused by the next run)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset of " + ",".join(MODELS))
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 64])
    parser.add_argument("--mode", choices=["sync", "async", "stream"], default="async",
                        help="client mode of the sweeps")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--window", type=float, default=1.5)
    parser.add_argument("--stable-windows", type=int, default=3)
    parser.add_argument("--max-windows", type=int, default=6)
    parser.add_argument("--stability", type=float, default=10.0)
    parser.add_argument("--ceiling-seconds", type=float, default=0.5)
    parser.add_argument("--ceiling-repeats", type=int, default=2)
    parser.add_argument("--locust-users", type=int, default=64, help="0: no locust run")
    parser.add_argument("--locust-seconds", type=int, default=20)
    parser.add_argument("--no-perf-analyzer", dest="perf_analyzer", action="store_false",
                        help="skip the Triton perf_analyzer cross-check (identity, concurrency 64)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the py-spy profile of the server under load")
    parser.add_argument("--max-load", type=float, default=1.5,
                        help="wait for the 1-minute load average to drop below this before starting")
    parser.add_argument("--wait-idle", type=float, default=600.0, help="the longest wait for that, seconds")
    parser.add_argument("--progress", choices=["auto", "rich", "plain", "none"], default="auto")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="measure nothing: write the markdown and plot from an earlier run's JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        build_parser().error(f"unknown models {sorted(unknown)}; choose from {', '.join(MODELS)}")
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = args.json or out.with_suffix(".json")
    if args.from_json:
        document = json.loads(args.from_json.read_text())
        command = document["command"]
    else:
        command = "python -m tensorwire.loadtest.benchmarks " + " ".join(
            argv if argv is not None else sys.argv[1:])
        document = measure(args)
        document["command"] = command
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    plot_name = None
    if not args.no_plot:
        plot_path = args.plot or out.with_suffix(".png")
        try:
            from tensorwire.loadtest.plot import plot_levels

            plot_levels(document["levels"], plot_path, title="tensorwire: throughput (solid), p99 (dashed), "
                                                              "ceiling (dotted)")
            plot_name = os.path.relpath(plot_path, out.parent)
        except Exception as err:  # matplotlib missing: the markdown still gets written
            log(f"no plot: {err}")
    notes = args.notes.read_text() if args.notes and args.notes.is_file() else None
    out.write_text(render(document, command, plot_name, notes))
    log(f"wrote {out}, {json_path}" + (f", {plot_name}" if plot_name else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
