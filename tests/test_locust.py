"""The locustfile, run the way operators run it: ``locust -f loadtest/locustfile.py --headless ...``.

The model that matters here sleeps a fixed 50 ms per request on 8 replicas with batching off, so N
concurrent users can get at most N / 0.05 s answers per second, and only if they really run
concurrently. Locust users are gevent greenlets: a grpcio call that is not gevent-aware blocks every
user, and throughput collapses towards 1 / 0.05 s. The control test removes ``init_gevent()`` from a
copy of the locustfile and shows that this check would catch it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from model_factory import onnx_identity, python_model
from serving import free_port, running_server

from tensorwire.loadtest.locust_runner import LOCUSTFILE, locust_command, run_headless

# Never import locust here: importing it monkey-patches the standard library for gevent in this
# (pytest) process, and every threaded test after it would then run on greenlets.
if importlib.util.find_spec("locust") is None:
    pytest.skip("the loadtest extra (locust) is not installed", allow_module_level=True)

LOCUST = locust_command()
SLEEP_S = 0.05
USERS = 8

SLEEP_MODEL = f"""
import time


class Model:
    def execute(self, inputs):
        time.sleep({SLEEP_S})
        return {{"OUTPUT0": inputs["INPUT0"].copy()}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("locust") / "models"
    python_model(
        repo,
        "sleep50",
        SLEEP_MODEL,
        {
            "max_batch_size": 0,
            "warmup": "none",
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [4]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [4]}],
            "instance_group": [{"kind": "cpu", "count": USERS}],  # 8 requests can sleep side by side
        },
    )
    onnx_identity(repo, "identity", dims=[16], max_batch_size=64)
    with running_server(repo, "--drain-seconds", "0") as srv:
        yield srv


def run_locust(
    tmp_path: Path,
    host: str,
    *args: str,
    locustfile: Path = LOCUSTFILE,
    seconds: int = 3,
    users: int = USERS,
    timeout: float = 60,
) -> tuple[dict, subprocess.CompletedProcess]:
    """Run locust headless (the harness's runner); returns the locustfile's --summary-json totals and the process."""
    summary, done = run_headless(
        host, *args, users=users, seconds=seconds, workdir=tmp_path, locustfile=locustfile, timeout_s=timeout
    )
    assert summary is not None, f"no summary (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return summary["total"], done


def test_users_run_concurrently_with_zero_failures(server, tmp_path):
    row, done = run_locust(tmp_path, server.address, "--model", "sleep50")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert row["requests"] > 0 and row["failures"] == 0, output
    # Each user waits 50 ms per call and the 8 calls sleep side by side: ~160 req/s. Users that
    # block one another (grpcio not gevent-aware) would give ~20-40 req/s instead.
    rps = row["requests_per_s"]
    assert rps >= 0.6 * USERS / SLEEP_S, f"{rps:.0f} req/s: locust users did not run concurrently\n{output}"
    # and locust timed the real calls (not ~0 ms)
    assert row["p50_ms"] >= SLEEP_S * 1e3 * 0.9, row
    assert "Traceback" not in server.log()


def test_stream_users_run_concurrently(server, tmp_path):
    """``--stream``: each user sends on its own ModelStreamInfer stream, still one greenlet per user."""
    row, done = run_locust(tmp_path, server.address, "--model", "sleep50", "--stream")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert row["requests"] > 0 and row["failures"] == 0, output
    assert row["requests_per_s"] >= 0.6 * USERS / SLEEP_S, f"{row['requests_per_s']:.0f} req/s\n{output}"
    assert row["p50_ms"] >= SLEEP_S * 1e3 * 0.9, row
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stream"] is True and list(summary["entries"]) == ["grpc-stream sleep50"]


def test_control_without_init_gevent_users_block_each_other(server, tmp_path):
    """Proof that the test above catches the mistake: the same locustfile without init_gevent()."""
    source = LOCUSTFILE.read_text()
    assert source.count("\ngrpc_gevent.init_gevent()") == 1
    broken = tmp_path / "locustfile_without_init_gevent.py"
    broken.write_text(source.replace("\ngrpc_gevent.init_gevent()", "\npass  # init_gevent() removed"))
    row, done = run_locust(tmp_path, server.address, "--model", "sleep50", locustfile=broken)
    rps = row["requests_per_s"]
    assert row["requests"] > 0, done.stderr
    assert rps < 0.5 * USERS / SLEEP_S, (
        f"{rps:.0f} req/s without init_gevent: the check above would not tell a blocked hub from a working one"
    )


def test_processes_mode(server, tmp_path):
    # --processes forks after importing the locustfile: each worker makes its own channel in on_start.
    port = free_port()
    row, done = run_locust(
        tmp_path,
        f"grpc://{server.address}",
        "--model",
        "identity",
        "--batch-size",
        "4",
        "--processes",
        "2",
        "--master-bind-host",
        "127.0.0.1",
        "--master-bind-port",
        str(port),
        "--master-port",
        str(port),
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert row["requests"] > 0 and row["failures"] == 0, output
    assert row["avg_response_bytes"] == 4 * 16 * 4  # 4 rows x 16 FP32 come back


def test_missing_model_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-t", "1s", "--host", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")},
    )
    assert done.returncode == 2
    assert "--model" in done.stderr


def test_unknown_model_counts_as_failures(server, tmp_path):
    row, done = run_locust(tmp_path, server.address, "--model", "no_such_model", seconds=1, users=2)
    assert row["failures"] >= 1 and row["failures"] == row["requests"], done.stderr
