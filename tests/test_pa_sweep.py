"""The perf_analyzer sweep script, end to end in its --quick form (about 30 s).

Builds the reference models and the INT8 CNN into a temporary folder, serves them, drives them with
Triton's perf_analyzer and checks the JSON and markdown it writes. Skips, saying so, only when
perf_analyzer cannot be set up (the first run needs the package registry; see test_perf_analyzer.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

LEVEL_NUMBERS = ("throughput_rps", "latency_p50_ms", "latency_p99_ms", "server_avg_batch", "server_cpu_cores",
                 "perf_analyzer_cpu_cores", "wall_s")


@pytest.fixture(scope="module")
def quick_run(perf_analyzer, tmp_path_factory):
    out = tmp_path_factory.mktemp("pa_sweep") / "out"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tensorwire.loadtest.pa_sweep", "--out", str(out), "--quick"],
            capture_output=True, text=True, timeout=180, cwd=out.parent,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"pa_sweep --quick did not finish within 180 s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"pa_sweep exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return out, done, json.loads((out / "pa_sweep.json").read_text())


def _positive(row: dict, keys) -> None:
    for key in keys:
        assert isinstance(row.get(key), int | float) and row[key] > 0, (key, row)


def test_levels_have_positive_numbers(quick_run):
    _, _, doc = quick_run
    assert doc["quick"] is True and doc["settings"]["concurrency"] == [1, 4]
    assert doc["settings"]["batch"] == 1
    assert set(doc["levels"]) == {"identity", "cnn"}
    for model, rows in doc["levels"].items():
        assert [r["concurrency"] for r in rows] == [1, 4], model
        for row in rows:
            assert "error" not in row, row
            assert row["model"] == model
            _positive(row, LEVEL_NUMBERS)
            assert row["latency_p50_ms"] <= row["latency_p99_ms"]
            assert row["server_avg_batch"] >= 1
            assert row["server_inference_count"] >= row["server_execution_count"] > 0
            assert "--async" in row["command"] and "-b 1" in row["command"]
    assert [(r["model"], r["concurrency"]) for r in doc["int8_levels"]] == [("cnn", 4), ("cnn_int8", 4)]
    for row in doc["int8_levels"]:
        assert "error" not in row, row
        _positive(row, LEVEL_NUMBERS)


def test_in_process_rows_and_targets(quick_run):
    _, _, doc = quick_run
    ceiling = doc["in_process"]["ceiling"]
    assert sorted({(r["threads"], r["batch_size"]) for r in ceiling}) == [
        (t, b) for t in (1, 2) for b in (1, 2, 4, 8, 16, 32, 64)
    ]
    for row in ceiling + doc["in_process"]["identity"] + doc["in_process"]["int8"]:
        _positive(row, ("samples_per_s", "batches_per_s", "latency_ms_p50"))
    assert {(r["model"], r["batch_size"], r["threads"]) for r in doc["in_process"]["int8"]} == {
        (m, b, 1) for m in ("cnn", "cnn_int8") for b in (1, 32)
    }
    targets = {t["name"]: t for t in doc["targets"]}
    assert set(targets) == {"cnn_vs_2thread_ceiling", "identity_throughput", "identity_c1_latency",
                            "cnn_c1_latency"}
    assert targets["cnn_vs_2thread_ceiling"]["value_pct"] > 0
    assert targets["identity_throughput"]["value_rps"] > 0
    for name in ("identity_c1_latency", "cnn_c1_latency"):
        t = targets[name]
        _positive(t, ("p50_ms", "in_process_ms", "limit_ms"))
        assert t["limit_ms"] == pytest.approx(t["in_process_ms"] + 0.5)
        assert isinstance(t["met"], bool)
    ratios = {r["name"]: r for r in doc["int8"]["ratios"]}
    assert set(ratios) == {"served", "in_process_batch1", "in_process_batch32"}
    for r in ratios.values():
        assert r["ratio"] > 0 and isinstance(r["met"], bool)


def test_machine_build_and_files(quick_run):
    out, done, doc = quick_run
    machine = doc["machine"]
    assert machine["cores"] >= 1 and len(machine["load_start"]) == 3 and len(machine["load_end"]) == 3
    assert doc["total_seconds"] > 0
    assert set(doc["build"]["models"]) == {"identity", "cnn", "cnn_int8"}
    assert (out / "models" / "cnn_int8" / "config.toml").is_file()
    assert (out / "models" / "cnn_int8" / "1" / "model.onnx").is_file()
    assert (out / "perf_inputs" / "cnn.json").is_file()
    assert 0 < doc["build"]["models"]["cnn_int8"]["bytes"] < doc["build"]["models"]["cnn"]["bytes"]
    assert doc["build"]["quantization"]["calibration_samples"] == 100
    assert doc["server"]["exit_status"] == 0 and doc["server"]["log_errors"] == []
    markdown = (out / "pa_sweep.md").read_text()
    assert markdown.strip() in done.stdout  # printed as well as written
    for heading in ("### identity", "### cnn", "### In-process ceiling", "### Targets", "## B. Served INT8"):
        assert heading in markdown
    assert "of the 2-thread ceiling" in markdown and "req/s (target ≥ 3,500)" in markdown
