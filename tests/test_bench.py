"""``tensorwire bench``: the closed-loop benchmark's numbers are complete and consistent.

One short real run (identity model, three modes, two levels, ceiling, plot) checked field by field;
a 50 ms sleeper with batching off checks that N workers really keep N requests in flight
(throughput ≈ N / 0.05 s, Little's law); the arithmetic helpers are checked on made-up data; the help
states each default once.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from model_factory import python_model
from serving import running_server

from tensorwire import cli
from tensorwire.loadtest import _stats, bench, ceiling, report
from tensorwire.loadtest.launch import serve
from tensorwire.loadtest.reference_models import build_repository

LEVEL_FIELDS = {
    "model",
    "mode",
    "series",
    "concurrency",
    "batch_size",
    "requests",
    "errors",
    "errors_total",
    "window_s",
    "windows",
    "stable",
    "window_throughputs_rps",
    "throughput_rps",
    "throughput_samples_per_s",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_mean_ms",
    "latency_max_ms",
    "server_avg_batch",
    "server_queue_us",
    "server_compute_us",
    "server_request_us",
    "server_requests",
    "server_executions",
    "server_inferences",
    "client_cpu_cores",
    "client_cpu_us_per_request",
    "server_cpu_cores",
    "server_cpu_us_per_request",
    "ceiling_batch",
    "ceiling_samples_per_s",
    "efficiency",
}
SLEEP_S = 0.05


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    repo = root / "models"
    build_repository(repo, models=["identity"], variants=["batched"], log=lambda *_: None)
    python_model(
        repo,
        "sleep50",
        f"""
import time


class Model:
    def execute(self, inputs):
        time.sleep({SLEEP_S})
        return {{"OUTPUT0": inputs["INPUT0"].copy()}}
""",
        {
            "max_batch_size": 8,
            "dynamic_batching": {"enabled": False},
            "warmup": "none",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
            "instance_group": [{"kind": "cpu", "count": 4}],
        },
    )
    with running_server(repo, "--drain-seconds", "0") as srv:
        srv.extra["repo"] = repo
        yield srv


@pytest.fixture(scope="module")
def short_run(server, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-out")
    json_path, png = out / "bench.json", out / "plot" / "bench.png"
    code = bench.main(
        [
            "--address",
            server.address,
            "--repo",
            str(server.extra["repo"]),
            "--model",
            "identity",
            "--server-pid",
            str(server.process.pid),
            "--concurrency",
            "1,4",
            "--mode",
            "sync,async,stream",
            "--warmup",
            "0.2",
            "--window",
            "0.3",
            "--stable-windows",
            "2",
            "--max-windows",
            "3",
            "--ceiling",
            "--ceiling-seconds",
            "0.05",
            "--ceiling-repeats",
            "1",
            "--json",
            str(json_path),
            "--plot",
            str(png),
            "--progress",
            "none",
            "--markdown",
        ]
    )
    assert code == 0
    return json.loads(json_path.read_text()), png


def test_json_has_every_field_for_every_level(short_run):
    document, _ = short_run
    levels = document["levels"]
    assert [(r["mode"], r["concurrency"]) for r in levels] == [
        (m, c) for m in ("sync", "async", "stream") for c in (1, 4)
    ]
    for row in levels:
        missing = LEVEL_FIELDS - row.keys()
        assert not missing, f"{row['mode']} c={row['concurrency']} lacks {sorted(missing)}"
    assert document["machine"]["cores"] >= 1 and document["settings"]["stability_pct"] == 10.0
    assert document["model"]["max_batch_size"] == 64 and document["model"]["dynamic_batching"] is True
    assert document["knee"]["concurrency"] in (1, 4)
    # the stream fast path is reported next to unary calls at every level
    pairs = document["stream_vs_unary"]
    assert [(p["concurrency"], p["unary_mode"]) for p in pairs] == [(1, "async"), (4, "async")]
    for pair in pairs:
        assert pair["ratio"] == pytest.approx(pair["stream_rps"] / pair["unary_rps"])


def test_numbers_are_consistent(short_run):
    document, _ = short_run
    for row in document["levels"]:
        where = f"{row['mode']} c={row['concurrency']}"
        n = row["concurrency"]
        assert row["errors"] == 0 and row["errors_total"] == 0, where
        assert row["requests"] > 0, where
        # requests = throughput x window (the windows are exactly the ones counted)
        assert row["requests"] == pytest.approx(row["throughput_rps"] * row["window_s"], rel=1e-6), where
        assert row["window_s"] == pytest.approx(row["windows"] * 0.3, rel=0.5), where
        assert row["throughput_samples_per_s"] == pytest.approx(row["throughput_rps"] * row["batch_size"])
        assert 0 < row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"] <= row["latency_max_ms"], (
            where
        )
        # a closed loop holds n requests in flight: throughput x mean latency ~ n (Little's law). Over a finite
        # window the requests that started before it count whole, so the sum of latencies is at most
        # n x (window + the longest latency): a stall on a busy machine inflates the estimate by that much.
        in_flight = row["throughput_rps"] * row["latency_mean_ms"] / 1e3
        boundary = row["latency_max_ms"] / 1e3 / row["window_s"]
        assert 0.5 * n <= in_flight <= 1.01 * n * (1 + boundary), f"{where}: {in_flight:.2f} in flight"
        # the server saw (about) the same requests in the same windows
        assert abs(row["server_requests"] - row["requests"]) <= max(2 * n + 2, 0.1 * row["requests"]), where
        assert 1 <= row["server_avg_batch"] <= n, where
        assert row["server_avg_batch"] == pytest.approx(row["server_inferences"] / row["server_executions"])
        assert row["server_queue_us"] >= 0 and row["server_compute_us"] > 0, where
        assert row["server_request_us"] / 1e3 <= row["latency_mean_ms"] * 1.1 + 0.5, where
        assert row["client_cpu_cores"] > 0 and row["server_cpu_cores"] > 0, where
        # efficiency against the in-process ceiling at the largest batch this level could form
        assert row["ceiling_batch"] <= min(64, n) and row["ceiling_samples_per_s"] > 0, where
        served, ceiling = row["throughput_samples_per_s"], row["ceiling_samples_per_s"]
        assert row["efficiency"] == pytest.approx(served / ceiling)
    ceiling = document["ceiling"]
    assert [c["batch_size"] for c in ceiling] == [1, 2, 4]
    assert document["ceiling_settings"]["replicas"] == 1


def test_plot_is_a_valid_png(short_run):
    _, png = short_run
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 200
    assert data.rstrip(b"\x00")[-8:-4] == b"IEND"
    matplotlib_image = pytest.importorskip("matplotlib.image")
    assert matplotlib_image.imread(str(png)).shape[:2] == (height, width)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_workers_keep_n_requests_in_flight(server, mode):
    """4 workers against a 50 ms model on 4 replicas, batching off: 80 req/s, 50 ms each."""
    n = 4
    settings = bench.BenchSettings(
        address=server.address,
        model="sleep50",
        concurrency=[n],
        modes=[mode],
        warmup_s=0.2,
        window_s=0.5,
        stable_windows=2,
        max_windows=4,
        stability_pct=25,
    )
    document = bench.bench_model(settings)
    (row,) = document["levels"]
    assert row["errors"] == 0
    assert row["throughput_rps"] == pytest.approx(n / SLEEP_S, rel=0.25), row["window_throughputs_rps"]
    assert row["latency_p50_ms"] == pytest.approx(SLEEP_S * 1e3, rel=0.3)
    assert row["server_avg_batch"] == 1.0  # batching off: every execution is one request
    assert row["ceiling_samples_per_s"] is None and row["efficiency"] is None


def test_cli_subcommand_and_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--help"])
    assert stop.value.code == 0
    assert "--concurrency" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--model", "m", "--mode", "turbo"])
    assert stop.value.code == 2
    # nothing listens on port 1: a clear error, exit code 1
    assert (
        bench.main(
            [
                "--address",
                "127.0.0.1:1",
                "--model",
                "m",
                "--concurrency",
                "1",
                "--progress",
                "none",
                "--ready-timeout",
                "1",
            ]
        )
        == 1
    )
    assert "error" in capsys.readouterr().err


def _help_entries(text: str) -> dict[str, str]:
    """Each option's help text (wrapped lines joined), keyed by the option's first spelling."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "tensorwire.cli", "bench", "--help"],
        [sys.executable, "-m", "tensorwire.loadtest.benchmarks", "--help"],
        [sys.executable, "-m", "tensorwire.loadtest.ceiling", "--help"],
    ],
)
def test_help_states_each_default_once(command):
    """Issue: ``bench --help`` printed every default twice ("(default: from metadata) (default: None)")."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    entries = _help_entries(out)
    assert len(entries) > 5
    for option, text in entries.items():
        assert len(re.findall(r"\bdefault\b", text)) <= 1, f"{option}: {text}"
        assert "(default: None)" not in text and "(default: False)" not in text, f"{option}: {text}"
    if "bench" in command:
        assert "(default: async,stream)" in entries["--mode"]
        assert "(default: 1,2,4,8,16,32,64)" in entries["--concurrency"]


# --------------------------------------------------------------------------- helpers, no server


def test_stability_and_percentiles():
    assert _stats.is_stable([100, 105, 95], 10)
    assert not _stats.is_stable([100, 130, 95], 10)
    assert _stats.is_stable([0, 0], 10) and not _stats.is_stable([], 10)
    p = _stats.percentiles_ms([0.001] * 98 + [0.002, 0.1])
    assert p["latency_p50_ms"] == pytest.approx(1.0)
    assert p["latency_p50_ms"] <= p["latency_p90_ms"] <= p["latency_p99_ms"] <= p["latency_max_ms"] == 100.0
    assert _stats.percentiles_ms([])["latency_p99_ms"] is None


def test_server_delta():
    before = _stats.ServerCounters(
        inference_count=10,
        execution_count=10,
        success_count=10,
        queue_count=10,
        queue_ns=10_000,
        compute_count=10,
        compute_ns=50_000,
        success_ns=100_000,
    )
    after = _stats.ServerCounters(
        inference_count=110,
        execution_count=35,
        success_count=110,
        queue_count=110,
        queue_ns=210_000,
        compute_count=110,
        compute_ns=1_050_000,
        success_ns=1_600_000,
    )
    d = _stats.server_delta(before, after)
    assert d["server_avg_batch"] == pytest.approx(4.0)
    assert d["server_queue_us"] == pytest.approx(2.0)
    assert d["server_compute_us"] == pytest.approx(10.0)
    assert d["server_request_us"] == pytest.approx(15.0)
    assert _stats.server_delta(None, after)["server_avg_batch"] is None


def test_ceiling_batch_sizes_and_efficiency():
    assert ceiling.ceiling_batch_sizes(1, 64, True, [1, 8, 32, 64]) == [1, 2, 4, 8, 16, 32, 64]
    assert ceiling.ceiling_batch_sizes(4, 64, True, [1, 8]) == [4, 8, 16, 32]
    assert ceiling.ceiling_batch_sizes(1, 64, False, [64]) == [1]
    points = [{"batch_size": b, "samples_per_s": s} for b, s in ((1, 100.0), (8, 400.0), (64, 800.0))]
    rows = [{"concurrency": c, "batch_size": 1, "throughput_samples_per_s": 200.0} for c in (1, 8, 64)]
    ceiling.attach_efficiency(rows, points, 64, True)
    assert [r["ceiling_batch"] for r in rows] == [1, 8, 64]
    assert [r["efficiency"] for r in rows] == [2.0, 0.5, 0.25]
    ceiling.attach_efficiency(rows, points, 64, False)  # no batching: the ceiling is batch 1
    assert {r["ceiling_batch"] for r in rows} == {1}


def test_cpu_and_report_helpers():
    assert _stats.process_tree_cpu_s(os.getpid()) >= _stats.own_cpu_s() * 0.99
    assert _stats.process_tree_cpu_s(2**22 + 12345) is None
    rows = [
        {"model": "m", "mode": "sync", "concurrency": c, "throughput_rps": t, "latency_p99_ms": 1.0, "stable": True}
        for c, t in ((1, 100.0), (8, 950.0), (32, 1000.0))
    ]
    assert report.knee(rows)["concurrency"] == 8
    table = report.markdown_table(rows)
    assert table.splitlines()[0].startswith("| model | mode | conc. | req/s |") and "| 950 |" in table
    info = report.machine()
    assert info["cores"] >= 1 and info["packages"]["numpy"]


def test_server_cpu_counts_its_child_processes():
    """A server with worker processes is measured whole: a busy child's CPU counts for its parent."""
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", burn])
    try:
        deadline = time.monotonic() + 30
        while sum(psutil.Process(child.pid).cpu_times()[:2]) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _stats.process_tree_cpu_s(os.getpid()) - _stats.own_cpu_s() >= 0.25
    finally:
        child.kill()
        child.wait()


def test_local_server_helper(tmp_path):
    repo = tmp_path / "models"
    build_repository(repo, models=["identity"], variants=["batched"], log=lambda *_: None)
    path, config = ceiling.latest_model_file(repo, "identity")
    assert path == repo / "identity" / "1" / "model.onnx" and config.max_batch_size == 64
    assert ceiling.ceiling_placement(config, 2) == (1, 1)  # reference identity: 1 thread, 1 replica
    with serve(repo, metrics=False) as server:
        pid = server.pid
        assert pid > 0 and Path(f"/proc/{pid}").exists() and server.metrics_port == 0
        log_path = server.log_path
        settings = bench.BenchSettings(
            address=server.address,
            model="identity",
            concurrency=[2],
            warmup_s=0.1,
            window_s=0.2,
            stable_windows=1,
            max_windows=1,
            server_pid=pid,
        )
        levels = bench.bench_model(settings)["levels"]
        assert [row["mode"] for row in levels] == ["async", "stream"]  # the default: unary and the stream
        assert all(row["requests"] > 0 and row["server_cpu_cores"] > 0 for row in levels)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not log_path.exists()  # a server started without a log folder leaves no log behind
