"""Interop: Triton's perf_analyzer drives the real tensorwire server and sees its statistics.

perf_analyzer is prepared by ``loadtest/perf_analyzer.sh`` (cached under .cache/perf_analyzer/) and run
through the harness's one reader of it (:mod:`tensorwire.loadtest.perf_analyzer`, its CSV report). The
first run needs the package registry (two wheels) and, when libb64 is missing, apt; these tests skip,
saying so, only when that set-up fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import running_server

from tensorwire.loadtest import perf_analyzer as pa
from tensorwire.loadtest.reference_models import build_repository

QUICK = {"measurement_interval_ms": 500, "stability_pct": 1000, "retry_stability_pct": 10000, "max_trials": 10}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("pa")
    build_repository(root / "models", models=["identity"], variants=["batched"], log=lambda *_: None)
    with running_server(root / "models") as srv:
        srv.extra["inputs"] = root / "perf_inputs" / "identity.json"
        srv.extra["root"] = root
        yield srv


def measure(server, **spec):
    row = pa.run(pa.PerfAnalyzerRun("identity", **spec), server, server.extra["inputs"], server.extra["root"] / "out")
    assert "error" not in row, f"{row['error']}\nserver:\n{server.log()}"
    assert "Traceback" not in server.log() and "level=ERROR" not in server.log(), server.log()
    return row


@pytest.mark.parametrize("concurrency", [1, 4])
def test_async_unary_levels_read_from_the_csv_report(perf_analyzer, server, concurrency):
    # Short windows and a lenient stability bound: this checks interoperability, not speed.
    row = measure(server, concurrency=concurrency, **QUICK)
    assert row["throughput_rps"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p90_ms"] <= row["latency_p99_ms"]
    # perf_analyzer read ModelStatistics (ServerMetadata lists 'statistics'): its report has the server columns
    assert row["server_queue_us"] is not None and row["server_compute_us"] > 0
    assert 1 <= row["server_avg_batch"] <= concurrency
    assert row["server_cpu_cores"] > 0 and row["perf_analyzer_cpu_cores"] > 0
    assert "--async" in row["command"] and f"--concurrency-range {concurrency}" in row["command"]


def test_streaming_batched_requests_count_samples(perf_analyzer, server):
    row = measure(server, concurrency=2, streaming=True, batch_size=4, **QUICK)
    # The server counts samples, not requests: over the whole run, exactly 4 per request.
    assert row["server_requests"] > 0 and row["server_inferences"] == 4 * row["server_requests"]
    assert "--streaming" in row["command"] and "-b 4" in row["command"]


def test_several_processes_at_once_add_up(perf_analyzer, server):
    row = measure(server, concurrency=2, processes=2, **QUICK)
    reports = sorted((server.extra["root"] / "out").glob(f"identity_unary_c2x2_try{row['attempts']}_p*.csv"))
    assert len(reports) == 2
    assert row["throughput_rps"] == pytest.approx(sum(pa.read_report(r)["throughput_rps"] for r in reports))


@pytest.fixture(scope="module")
def http_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("pa-http")
    build_repository(root / "models", models=["identity"], variants=["batched"], log=lambda *_: None)
    with running_server(root / "models", http=True) as srv:
        srv.extra["inputs"] = root / "perf_inputs" / "identity.json"
        srv.extra["root"] = root
        yield srv


@pytest.mark.parametrize("concurrency", [1, 4])
def test_perf_analyzer_over_http(perf_analyzer, http_server, concurrency):
    """``-i http``: binary tensors through the HTTP front-end, statistics read from /v2/models/.../stats."""
    row = measure(http_server, protocol="http", concurrency=concurrency, **QUICK)
    assert row["mode"] == "http" and row["throughput_rps"] > 0
    assert row["server_compute_us"] > 0 and row["server_queue_us"] is not None  # it read our statistics
    assert 1 <= row["server_avg_batch"] <= concurrency
    assert "-i http" in row["command"] and f"127.0.0.1:{http_server.http_port}" in row["command"]


def test_http_and_streaming_arguments():
    http = pa.PerfAnalyzerRun("m", 16, protocol="http")
    args = http.args("127.0.0.1:8000", inputs=Path("m.json"), stability_pct=25)
    assert args[args.index("-i") + 1] == "http" and "--async" in args and "-f" not in args
    assert http.mode == "http"
    stream = pa.PerfAnalyzerRun("m", 16, streaming=True, processes=4)
    assert "--streaming" in stream.args("a:1", inputs=Path("m.json"), stability_pct=25)
    with pytest.raises(ValueError, match="gRPC"):
        pa.PerfAnalyzerRun("m", 1, protocol="http", streaming=True)
    with pytest.raises(ValueError):
        pa.PerfAnalyzerRun("m", 0)


def test_http_without_an_http_front_end_is_an_error_row(server):
    row = pa.run(
        pa.PerfAnalyzerRun("identity", 1, protocol="http"), server, server.extra["inputs"], server.extra["root"] / "out"
    )
    assert "HTTP" in row["error"]
