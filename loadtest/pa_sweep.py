"""Triton's perf_analyzer against tensorwire: the concurrency sweep (issue 2) and served INT8 vs FP32 (issue 4).

    python -m tensorwire.loadtest.pa_sweep --out .cache/pa_sweep [--quick]

One run, in order (about 4 minutes on a 2-core machine; ``--quick``: about 30 s, for a smoke test):

1. builds the ``identity`` and ``cnn`` reference models (:mod:`tensorwire.loadtest.reference_models`)
   into ``<out>/models`` (perf inputs in ``<out>/perf_inputs``), and an INT8 copy of the CNN,
   ``cnn_int8``: static QDQ quantization (:func:`tensorwire.trainer.quantize.quantize_static`,
   per-channel) calibrated on 100 seeded samples of the perf input distribution (standard normal,
   clipped to [-3, 3]), published with the same config as ``cnn``;
2. measures in process, with no server running: the ONNX Runtime ceiling of the CNN file at batch
   1..64 with 1 and 2 intra-op threads, identity at batch 1, and both CNN files at batch 1 and 32
   with 1 thread (:func:`tensorwire.loadtest.ceiling.measure_ceiling`);
3. starts ``tensorwire serve`` on a free loopback port and runs perf_analyzer (``loadtest/perf_analyzer.sh``,
   gRPC, ``--async``, ``-b 1``) once per concurrency level, 1/4/16/64, for identity and cnn, then cnn
   and cnn_int8 at concurrency 64. Per level it records perf_analyzer's client throughput, p50/p99
   and the server-side inference/execution counts (average batch), and the CPU the server process
   (``/proc/<pid>/stat``) and the perf_analyzer process (``wait4`` rusage) used over that level;
4. prints markdown tables and the target lines computed from the numbers, and writes them to
   ``<out>/pa_sweep.md``, the raw numbers to ``<out>/pa_sweep.json`` and perf_analyzer's own output per
   level under ``<out>/perf_analyzer/``.

perf_analyzer fails a level whose windows do not agree within the stability percentage; such a level is
run once more with a looser bound (recorded as ``stability_pct`` and ``attempts``). Client, server and
the load generator share the machine's cores: the load averages at start and end are recorded, and
numbers from a busy machine are low and noisy.

Exit status: 0 when every level was measured, 1 when some level failed (the files are still written),
2 when perf_analyzer cannot be set up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PERF_ANALYZER = Path(__file__).with_name("perf_analyzer.sh")
MODELS = ("identity", "cnn")
INT8_MODEL = "cnn_int8"
CALIBRATION_SAMPLES = 100
CALIBRATION_SEED = 1  # the perf input files use seed 0: calibrate on other samples of the same distribution
CEILING_BATCHES = (1, 2, 4, 8, 16, 32, 64)
CEILING_THREADS = (1, 2)
INT8_BATCHES = (1, 32)
LATENCY_ALLOWANCE_MS = 0.5

TARGET_CEILING_PCT = 50.0
TARGET_IDENTITY_RPS = 3500.0
TARGET_INT8_SERVED = 1.3
TARGET_INT8_IN_PROCESS = 1.8


@dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...]
    measurement_interval_ms: int
    stability_pct: int
    retry_stability_pct: int
    max_trials: int
    ceiling_seconds: float
    ceiling_repeats: int
    ceiling_warmup_seconds: float

    @property
    def top(self) -> int:
        return max(self.concurrency)


FULL = Settings(concurrency=(1, 4, 16, 64), measurement_interval_ms=3000, stability_pct=25, retry_stability_pct=100,
                max_trials=6, ceiling_seconds=1.0, ceiling_repeats=2, ceiling_warmup_seconds=0.2)
QUICK = Settings(concurrency=(1, 4), measurement_interval_ms=500, stability_pct=100, retry_stability_pct=1000,
                 max_trials=4, ceiling_seconds=0.1, ceiling_repeats=1, ceiling_warmup_seconds=0.05)


_T0 = time.perf_counter()


def log(text: str) -> None:
    print(f"pa_sweep [{time.perf_counter() - _T0:5.1f}s]: {text}", file=sys.stderr, flush=True)


def load_averages() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- models


def build_models(out: Path) -> dict[str, Any]:
    """identity + cnn into ``<out>/models`` and cnn_int8 beside them; returns what was built."""
    from tensorwire.loadtest.reference_models import build_repository, sample_inputs, write_perf_inputs
    from tensorwire.repository import load_model_config, write_model_config
    from tensorwire.trainer.quantize import quantize_static

    repo = out / "models"
    inputs_dir = out / "perf_inputs"
    started = time.perf_counter()
    built = build_repository(repo, models=list(MODELS), variants=["batched"], inputs_dir=inputs_dir,
                             log=lambda text: log(f"built {text}"))
    models = {
        b.name: {"file": str(b.path), "bytes": b.path.stat().st_size, "inputs": str(b.inputs_json),
                 "flops_per_sample": b.flops}
        for b in built
    }
    fp32 = Path(models["cnn"]["file"])
    int8 = repo / INT8_MODEL / "1" / "model.onnx"
    int8.parent.mkdir(parents=True, exist_ok=True)
    samples = sample_inputs("cnn", CALIBRATION_SAMPLES, CALIBRATION_SEED)
    quantize_started = time.perf_counter()
    quantize_static(fp32, int8, samples, per_channel=True)
    quantize_s = time.perf_counter() - quantize_started
    config = load_model_config(repo / "cnn")
    metadata = {**config.metadata, "description": "static INT8 (QDQ, per-channel) copy of the 'cnn' reference model",
                "quantization": f"onnxruntime quantize_static, MinMax on {CALIBRATION_SAMPLES} samples "
                                f"(seed {CALIBRATION_SEED})"}
    write_model_config(config.model_copy(update={"metadata": metadata}), repo / INT8_MODEL)
    inputs = write_perf_inputs("cnn", inputs_dir / f"{INT8_MODEL}.json")  # the same samples as cnn.json
    models[INT8_MODEL] = {"file": str(int8), "bytes": int8.stat().st_size, "inputs": str(inputs),
                          "flops_per_sample": models["cnn"]["flops_per_sample"]}
    agreement = _top1_agreement(fp32, int8)
    log(f"quantized cnn -> {INT8_MODEL} in {quantize_s:.1f}s ({int8.stat().st_size / 1e3:.0f} kB, "
        f"top-1 agreement with FP32 {agreement:.1%})")
    return {
        "repo": str(repo),
        "models": models,
        "quantization": {
            "method": "static QDQ, per-channel int8 weights, uint8 activations, MinMax calibration",
            "calibration_samples": CALIBRATION_SAMPLES,
            "calibration_seed": CALIBRATION_SEED,
            "calibration_distribution": "standard normal clipped to [-3, 3], as the perf inputs",
            "seconds": round(quantize_s, 2),
            "top1_agreement": agreement,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


def _top1_agreement(fp32: Path, int8: Path, samples: int = 256) -> float:
    """How often the INT8 model's argmax matches FP32's on fresh seeded samples (a sanity check)."""
    from tensorwire.loadtest.ceiling import make_session
    from tensorwire.loadtest.reference_models import sample_inputs

    x = sample_inputs("cnn", samples, CALIBRATION_SEED + 1)
    a = make_session(fp32, 1).run(None, {"INPUT0": x})[0]
    b = make_session(int8, 1).run(None, {"INPUT0": x})[0]
    return float((a.argmax(1) == b.argmax(1)).mean())


# --------------------------------------------------------------------------- in process


def measure_in_process(built: dict[str, Any], settings: Settings) -> dict[str, Any]:
    from tensorwire.loadtest.ceiling import measure_ceiling

    timing = {"seconds": settings.ceiling_seconds, "repeats": settings.ceiling_repeats,
              "warmup_seconds": settings.ceiling_warmup_seconds}
    files = {name: Path(info["file"]) for name, info in built["models"].items()}
    log(f"in-process ceiling: cnn at batch {','.join(map(str, CEILING_BATCHES))}, "
        f"threads {','.join(map(str, CEILING_THREADS))}")
    ceiling = measure_ceiling(files["cnn"], CEILING_BATCHES, CEILING_THREADS, **timing)
    log("in-process: identity at batch 1")
    identity = measure_ceiling(files["identity"], (1,), CEILING_THREADS, **timing)
    log(f"in-process: cnn and {INT8_MODEL} at batch {','.join(map(str, INT8_BATCHES))}, 1 thread")
    int8 = []
    for name in ("cnn", INT8_MODEL):
        int8 += measure_ceiling(files[name], INT8_BATCHES, (1,), **timing)
    return {"ceiling": ceiling, "identity": identity, "int8": int8, "timing": timing}


# --------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``tensorwire serve`` as a subprocess on a free loopback port."""

    def __init__(self, repo: Path, log_path: Path) -> None:
        self.port = _free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "tensorwire.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1",
                   "--grpc-port", str(self.port), "--metrics-port", "0", "--log-level", "WARNING",
                   "--drain-seconds", "0"]
        with open(log_path, "wb") as handle:
            self.process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, models: Sequence[str], timeout: float = 120) -> float:
        """Poll ServerReady, then ModelReady for each model; returns the seconds it took."""
        import grpc

        from tensorwire.proto import inference_pb2 as pb
        from tensorwire.proto.service import METHODS

        def stub(channel, method: str):
            m = METHODS[method]
            return channel.unary_unary(m.path, request_serializer=m.request.SerializeToString,
                                       response_deserializer=m.response.FromString)

        started = time.monotonic()
        deadline = started + timeout
        with grpc.insecure_channel(self.address) as channel:
            server_ready, model_ready = stub(channel, "ServerReady"), stub(channel, "ModelReady")
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if server_ready(pb.ServerReadyRequest(), timeout=1).ready and all(
                        model_ready(pb.ModelReadyRequest(name=m), timeout=1).ready for m in models
                    ):
                        return time.monotonic() - started
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log()}")

    def cpu_seconds(self) -> float | None:
        from tensorwire.loadtest._stats import process_cpu_seconds

        return process_cpu_seconds(self.pid)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# --------------------------------------------------------------------------- perf_analyzer


def setup_perf_analyzer(script: Path = PERF_ANALYZER) -> str | None:
    """Prepare the binary (cached); None when ready, else why not."""
    try:
        done = subprocess.run([str(script), "--setup-only"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "perf_analyzer setup did not finish within 300 s"
    except OSError as err:
        return f"cannot run {script}: {err}"
    return None if done.returncode == 0 else done.stderr.strip()[-600:] or f"exit status {done.returncode}"


_NUMBER = r"([0-9][0-9.,e+]*)"


def _number(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1).replace(",", "")) if match else None


def parse_perf_analyzer(output: str) -> dict[str, Any]:
    """The numbers of one concurrency level from perf_analyzer's stdout (µs turned into ms)."""
    section = output.split("Request concurrency:", 1)[-1]
    client, _, server = section.partition("Server:")
    server = server.split("Inferences/Second vs.", 1)[0]
    us = {key: _number(rf"{label}: {_NUMBER} usec", client) for key, label in
          (("avg", "Avg latency"), ("p50", "p50 latency"), ("p90", "p90 latency"), ("p95", "p95 latency"),
           ("p99", "p99 latency"))}
    inferences = _number(rf"Inference count: {_NUMBER}", server)
    executions = _number(rf"Execution count: {_NUMBER}", server)
    requests = _number(rf"Successful request count: {_NUMBER}", server)
    row: dict[str, Any] = {
        "throughput_rps": _number(rf"Throughput: {_NUMBER} infer/sec", client),
        "client_requests": _number(rf"Request count: {_NUMBER}", client),
        **{f"latency_{key}_ms": None if value is None else value / 1e3 for key, value in us.items()},
        "server_inference_count": inferences,
        "server_execution_count": executions,
        "server_request_count": requests,
        "server_avg_batch": inferences / executions if inferences and executions else None,
        "server_request_latency_ms": _ms(_number(rf"Avg request latency: {_NUMBER} usec", server)),
        "server_queue_ms": _ms(_number(rf"queue {_NUMBER} usec", server)),
        "server_compute_infer_ms": _ms(_number(rf"compute infer {_NUMBER} usec", server)),
    }
    return row


def _ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def _run_measured(command: list[str], log_path: Path, timeout: float) -> tuple[int, float, float]:
    """Run a command with its output in a file; (exit status, wall s, its own CPU s from wait4's rusage)."""
    with open(log_path, "wb") as handle:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, lambda: os.kill(process.pid, signal.SIGKILL))
    timer.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return process.returncode, wall, usage.ru_utime + usage.ru_stime


def run_level(script: Path, server: Server, model: str, concurrency: int, inputs: Path, settings: Settings,
              out_dir: Path, tag: str = "") -> dict[str, Any]:
    """One perf_analyzer process at one concurrency level, retried once with a looser stability bound."""
    out_dir.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"model": model, "concurrency": concurrency}
    attempts = []
    for attempt, stability in enumerate((settings.stability_pct, settings.retry_stability_pct), start=1):
        args = ["-m", model, "-u", server.address, "-i", "grpc", "--async", "-b", "1",
                "--concurrency-range", str(concurrency), "--input-data", str(inputs),
                "-s", str(stability), "--measurement-interval", str(settings.measurement_interval_ms),
                "--max-trials", str(settings.max_trials)]
        log_path = out_dir / f"{model}_c{concurrency}{tag}_try{attempt}.log"
        timeout = settings.max_trials * settings.measurement_interval_ms / 1e3 * 2 + 60
        server_before = server.cpu_seconds()
        status, wall, pa_cpu = _run_measured([str(script), *args], log_path, timeout)
        server_after = server.cpu_seconds()
        output = log_path.read_text(errors="replace")
        attempts.append({"stability_pct": stability, "exit_status": status, "wall_s": round(wall, 2),
                         "log": str(log_path)})
        if server.process.poll() is not None:
            row["error"] = f"the server exited ({server.process.returncode}) during the level"
            break
        unstable = "Failed to obtain stable measurement" in output
        if status != 0:
            said = [line.strip() for line in output.splitlines() if line.strip()]
            why = next((line for line in said if "rror" in line or "Failed" in line), said[-1] if said else "")
            row["error"] = f"perf_analyzer exited {status}: {why}" if status > 0 else f"killed after {timeout:.0f}s"
            if unstable and attempt == 1:
                log(f"  {model} c={concurrency}: not stable within {stability}% in {settings.max_trials} "
                    f"windows; retrying with -s {settings.retry_stability_pct}")
                continue
            break
        row.pop("error", None)
        row.update(parse_perf_analyzer(output))
        server_cpu = None if server_before is None or server_after is None else server_after - server_before
        row.update({
            "stability_pct": stability,
            "attempts": attempt,
            "wall_s": round(wall, 2),
            "server_cpu_s": server_cpu,
            "server_cpu_cores": None if server_cpu is None else server_cpu / wall,
            "perf_analyzer_cpu_s": pa_cpu,
            "perf_analyzer_cpu_cores": pa_cpu / wall,
            "command": "loadtest/perf_analyzer.sh " + " ".join(a if a != str(inputs) else inputs.name for a in args),
        })
        if row["throughput_rps"] is None:
            row["error"] = "could not parse perf_analyzer's output"
        break
    row["tries"] = attempts
    if "error" in row:
        log(f"  {model} c={concurrency}: FAILED: {row['error']}")
    else:
        log(f"  {model} c={concurrency}: {row['throughput_rps']:,.0f} infer/s, p50 {row['latency_p50_ms']:.2f} ms, "
            f"p99 {row['latency_p99_ms']:.2f} ms, avg batch {_f(row['server_avg_batch'], '{:.2f}')}, server "
            f"{_f(row['server_cpu_cores'], '{:.2f}')} cores, perf_analyzer {row['perf_analyzer_cpu_cores']:.2f} cores")
    return row


# --------------------------------------------------------------------------- targets


def _best(rows: Sequence[dict[str, Any]], **where: Any) -> dict[str, Any] | None:
    chosen = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    return max(chosen, key=lambda r: r["samples_per_s"]) if chosen else None


def _level(rows: Sequence[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    row = next((r for r in rows if r["concurrency"] == concurrency), None)
    return row if row and "error" not in row else None


def compute_targets(document: dict[str, Any]) -> list[dict[str, Any]]:
    settings = document["settings"]
    top = max(settings["concurrency"])
    levels, in_process = document["levels"], document["in_process"]
    note = "" if top == 64 else f" (quick run: c={top}; the target is defined at c=64)"
    targets = []

    ceiling_2t = _best(in_process["ceiling"], threads=2)
    cnn_top = _level(levels["cnn"], top)
    value = None
    if ceiling_2t and cnn_top:
        value = 100 * cnn_top["throughput_rps"] / ceiling_2t["samples_per_s"]
        text = (f"CNN at c={top} = {value:.0f} % of the 2-thread ceiling ({cnn_top['throughput_rps']:,.0f} of "
                f"{ceiling_2t['samples_per_s']:,.0f} samples/s, best at batch {ceiling_2t['batch_size']}) "
                f"(target ≥ {TARGET_CEILING_PCT:.0f} %)")
    else:
        text = f"CNN at c={top}: not measured (target ≥ {TARGET_CEILING_PCT:.0f} % of the 2-thread ceiling)"
    targets.append({"name": "cnn_vs_2thread_ceiling", "text": text + note, "value_pct": value,
                    "target_pct": TARGET_CEILING_PCT, "met": None if value is None else value >= TARGET_CEILING_PCT})

    identity_top = _level(levels["identity"], top)
    value = identity_top["throughput_rps"] if identity_top else None
    text = (f"identity at c={top} = {value:,.0f} req/s" if value is not None else f"identity at c={top}: not measured")
    targets.append({"name": "identity_throughput", "text": f"{text} (target ≥ {TARGET_IDENTITY_RPS:,.0f}){note}",
                    "value_rps": value, "target_rps": TARGET_IDENTITY_RPS,
                    "met": None if value is None else value >= TARGET_IDENTITY_RPS})

    for model, rows in (("identity", in_process["identity"]), ("cnn", in_process["ceiling"])):
        best = _best(rows, batch_size=1)
        c1 = _level(levels[model], 1)
        in_ms = 1e3 / best["batches_per_s"] if best else None
        limit = None if in_ms is None else in_ms + LATENCY_ALLOWANCE_MS
        p50 = c1["latency_p50_ms"] if c1 else None
        if p50 is not None and limit is not None:
            text = (f"{model} c=1 p50 = {p50:.3f} ms vs in-process batch-1 latency {in_ms:.3f} ms "
                    f"({best['threads']} thread{'s' if best['threads'] > 1 else ''}) + {LATENCY_ALLOWANCE_MS} ms "
                    f"= {limit:.3f} ms (overhead {p50 - in_ms:.3f} ms)")
        else:
            text = f"{model} c=1 p50 vs in-process batch-1 latency + {LATENCY_ALLOWANCE_MS} ms: not measured"
        targets.append({"name": f"{model}_c1_latency", "text": text, "p50_ms": p50, "in_process_ms": in_ms,
                        "in_process_threads": best["threads"] if best else None, "limit_ms": limit,
                        "met": None if p50 is None or limit is None else p50 <= limit})
    return targets


def compute_int8(document: dict[str, Any]) -> dict[str, Any]:
    top = max(document["settings"]["concurrency"])
    served = {r["model"]: r for r in document["int8_levels"] if "error" not in r}
    rows = document["in_process"]["int8"]
    in_process = {(r["model"], r["batch_size"]): r["samples_per_s"] for r in rows}
    ratios = []
    fp32, int8 = served.get("cnn"), served.get(INT8_MODEL)
    ratio = int8["throughput_rps"] / fp32["throughput_rps"] if fp32 and int8 else None
    ratios.append({"name": "served", "text": f"served at c={top}", "ratio": ratio, "target": TARGET_INT8_SERVED,
                   "met": None if ratio is None else ratio >= TARGET_INT8_SERVED})
    for batch in INT8_BATCHES:
        a, b = in_process.get(("cnn", batch)), in_process.get((INT8_MODEL, batch))
        ratio = b / a if a and b else None
        ratios.append({"name": f"in_process_batch{batch}", "text": f"in-process batch {batch}, 1 thread",
                       "ratio": ratio, "target": TARGET_INT8_IN_PROCESS,
                       "met": None if ratio is None else ratio >= TARGET_INT8_IN_PROCESS})
    return {"concurrency": top, "ratios": ratios}


# --------------------------------------------------------------------------- markdown


def _f(value: Any, pattern: str = "{:,.0f}") -> str:
    return "–" if value is None else pattern.format(value)


def _met(flag: bool | None) -> str:
    return "not measured" if flag is None else ("met" if flag else "NOT met")


def _level_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["| concurrency | infer/s | p50 ms | p99 ms | server avg batch | server CPU (cores) "
             "| perf_analyzer CPU (cores) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['concurrency']} | failed: {r['error']} | | | | | |")
            continue
        mark = "" if r["attempts"] == 1 else f" (-s {r['stability_pct']})"
        lines.append(
            f"| {r['concurrency']} | {_f(r['throughput_rps'])}{mark} | {_f(r['latency_p50_ms'], '{:.2f}')} "
            f"| {_f(r['latency_p99_ms'], '{:.2f}')} | {_f(r['server_avg_batch'], '{:.2f}')} "
            f"| {_f(r['server_cpu_cores'], '{:.2f}')} | {_f(r['perf_analyzer_cpu_cores'], '{:.2f}')} |"
        )
    return lines


def _ceiling_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    threads = sorted({r["threads"] for r in rows})
    head = "| batch | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}: samples/s | p50 ms" for t in threads) + " |"
    lines = [head, "|---:|" + "---:|---:|" * len(threads)]
    for batch in sorted({r["batch_size"] for r in rows}):
        cells = []
        for t in threads:
            r = next((x for x in rows if x["threads"] == t and x["batch_size"] == batch), None)
            cells += [_f(r and r["samples_per_s"]), _f(r and r["latency_ms_p50"], "{:.3f}")]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return lines


def render(document: dict[str, Any]) -> str:
    s, machine = document["settings"], document["machine"]
    top = max(s["concurrency"])
    models = document["build"]["models"]
    lines = [
        "# perf_analyzer sweep: tensorwire over gRPC" + (" (QUICK smoke run: not for numbers)" if document["quick"]
                                                         else ""),
        "",
        f"`{document['command']}` — {document['started']}, {machine['cores']} cores ({machine['cpu']}), "
        f"load average (1/5/15 min) {_loads(machine['load_start'])} at start, {_loads(machine['load_end'])} "
        f"at end; total {document['total_seconds']:.0f} s.",
        "",
        f"perf_analyzer 2.51.0 (`loadtest/perf_analyzer.sh`): `-i grpc --async -b 1 --concurrency-range C "
        f"--input-data <perf_inputs>/<model>.json -s {s['stability_pct']} --measurement-interval "
        f"{s['measurement_interval_ms']} --max-trials {s['max_trials']}`, one process per level (a level not "
        f"stable within {s['stability_pct']} % is rerun once with `-s {s['retry_stability_pct']}`, marked). "
        "infer/s, p50 and p99 are perf_analyzer's client numbers; server avg batch = server-side "
        "inference count / execution count; CPU = CPU seconds of the process over the level's wall time "
        "(server: /proc/<pid>/stat; perf_analyzer: its rusage), on a machine the two share.",
        "",
        "## A. Concurrency sweep (issue 2)",
        "",
    ]
    for model in MODELS:
        lines += [f"### {model} ({_size(models[model]['bytes'])} model file)", "",
                  *_level_table(document["levels"][model]), ""]
    timing = document["in_process"]["timing"]
    lines += [
        f"### In-process ceiling: cnn (ONNX Runtime alone, median of {timing['repeats']} × {timing['seconds']} s)",
        "",
        *_ceiling_table(document["in_process"]["ceiling"]),
        "",
        "identity in process, batch 1: "
        + ", ".join(f"{r['threads']} thread{'s' if r['threads'] > 1 else ''} {r['batches_per_s']:,.0f} calls/s "
                    f"(p50 {r['latency_ms_p50'] * 1e3:.0f} µs)" for r in document["in_process"]["identity"]),
        "",
        "### Targets",
        "",
    ]
    lines += [f"- {t['text']}: **{_met(t['met'])}**" for t in document["targets"]]
    int8 = document["int8"]
    lines += [
        "",
        f"## B. Served INT8 vs FP32: cnn at concurrency {top} (issue 4)",
        "",
        f"`{INT8_MODEL}`: {document['build']['quantization']['method']}, "
        f"{document['build']['quantization']['calibration_samples']} calibration samples "
        f"({document['build']['quantization']['calibration_distribution']}, seed "
        f"{document['build']['quantization']['calibration_seed']}); top-1 agreement with FP32 on 256 fresh "
        f"samples {document['build']['quantization']['top1_agreement']:.1%}. Same config.toml as `cnn`.",
        "",
        f"| model | file | served infer/s (c={top}) | p50 ms | p99 ms | server avg batch | server CPU (cores) "
        f"| in-process b1 samples/s | in-process b32 samples/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    in_process = {(r["model"], r["batch_size"]): r for r in document["in_process"]["int8"]}
    for model in ("cnn", INT8_MODEL):
        r = next((x for x in document["int8_levels"] if x["model"] == model), {"error": "not run"})
        ok = "error" not in r
        cells = [_f(r.get("throughput_rps")) if ok else f"failed: {r['error']}",
                 _f(r.get("latency_p50_ms"), "{:.2f}"), _f(r.get("latency_p99_ms"), "{:.2f}"),
                 _f(r.get("server_avg_batch"), "{:.2f}"), _f(r.get("server_cpu_cores"), "{:.2f}")]
        cells += [_f(in_process.get((model, b), {}).get("samples_per_s")) for b in INT8_BATCHES]
        lines.append(f"| {model} | {_size(models[model]['bytes'])} | " + " | ".join(cells) + " |")
    lines += ["", "INT8 / FP32:", ""]
    lines += [f"- {r['text']}: {_f(r['ratio'], '{:.2f}')}× (target ≥ {r['target']}×): **{_met(r['met'])}**"
              for r in int8["ratios"]]
    lines.append("")
    return "\n".join(lines)


def _size(size: int) -> str:
    return f"{size / 1e6:.2f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"


def _loads(values: list[float] | None) -> str:
    return "–" if not values else " / ".join(f"{v:.2f}" for v in values)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- main


def run(out: Path, quick: bool, script: Path = PERF_ANALYZER, command: str = "") -> tuple[dict[str, Any], str]:
    settings = QUICK if quick else FULL
    started = time.perf_counter()
    document: dict[str, Any] = {
        "version": 1,
        "command": command,
        "quick": quick,
        "started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version(),
                    "load_start": load_averages()},
        "settings": {**asdict(settings), "concurrency": list(settings.concurrency), "batch": 1},
    }
    out.mkdir(parents=True, exist_ok=True)
    document["build"] = build_models(out)
    document["in_process"] = measure_in_process(document["build"], settings)
    inputs = {name: Path(info["inputs"]) for name, info in document["build"]["models"].items()}

    log("starting tensorwire serve")
    server = Server(Path(document["build"]["repo"]), out / "server.log")
    pa_dir = out / "perf_analyzer"
    try:
        ready_s = server.wait_ready([*MODELS, INT8_MODEL])
        log(f"server ready on {server.address} in {ready_s:.1f}s (pid {server.pid})")
        document["server"] = {"address": server.address, "ready_s": round(ready_s, 2)}
        document["levels"] = {}
        for model in MODELS:
            log(f"perf_analyzer: {model}, concurrency {','.join(map(str, settings.concurrency))}")
            document["levels"][model] = [run_level(script, server, model, c, inputs[model], settings, pa_dir)
                                         for c in settings.concurrency]
        log(f"perf_analyzer: cnn and {INT8_MODEL} at concurrency {settings.top}")
        document["int8_levels"] = [run_level(script, server, model, settings.top, inputs[model], settings, pa_dir,
                                             tag="_int8cmp") for model in ("cnn", INT8_MODEL)]
    finally:
        status = server.stop()
        document.setdefault("server", {})["exit_status"] = status
        problems = [line for line in server.log().splitlines() if "Traceback" in line or "level=ERROR" in line]
        document["server"]["log_errors"] = problems[:20]
    document["targets"] = compute_targets(document)
    document["int8"] = compute_int8(document)
    document["machine"]["load_end"] = load_averages()
    document["total_seconds"] = round(time.perf_counter() - started, 1)
    markdown = render(document)
    return document, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.pa_sweep",
        description="perf_analyzer concurrency sweep of tensorwire (identity, cnn), the in-process ceiling, "
                    "and served INT8 vs FP32.",
    )
    parser.add_argument("--out", type=Path, default=Path(".cache/pa_sweep"),
                        help="work and output folder: models/, perf_inputs/, perf_analyzer/, pa_sweep.md/.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: concurrency 1,4 only and short windows (about 30 s); not for numbers")
    args = parser.parse_args(argv)
    command = "python -m tensorwire.loadtest.pa_sweep " + " ".join(sys.argv[1:] if argv is None else argv)

    why = setup_perf_analyzer()
    if why is not None:
        print(f"pa_sweep: perf_analyzer could not be set up: {why}", file=sys.stderr)
        return 2
    loads = load_averages()
    if loads and loads[0] > (os.cpu_count() or 1) * 0.5:
        log(f"warning: load average {loads[0]:.2f} on {os.cpu_count()} cores at start: other processes compete "
            "for the CPU and the numbers will be low and noisy")
    out = args.out.resolve()
    document, markdown = run(out, args.quick, command=command)
    (out / "pa_sweep.md").write_text(markdown)
    (out / "pa_sweep.json").write_text(json.dumps(document, indent=2) + "\n")
    print(markdown)
    log(f"wrote {out / 'pa_sweep.md'} and {out / 'pa_sweep.json'} ({document['total_seconds']:.0f} s)")
    if not args.quick and document["total_seconds"] > 360:
        log(f"warning: the run took {document['total_seconds']:.0f} s (budget 360 s): perf_analyzer levels "
            "needed retries or the machine is busy")
    failed = [f"{r['model']} c={r['concurrency']}" for rows in [*document["levels"].values(), document["int8_levels"]]
              for r in rows if "error" in r]
    if failed:
        log(f"failed levels: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
