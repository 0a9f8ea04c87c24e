"""``tensorwire serve --workers N``: front-end processes in front of one engine process, through real gRPC.

Two kinds of tests here:

- what only the multi-process server has: tensors of every size and kind crossing the process boundary
  intact, a batch forming from connections that landed on different front-ends, one /metrics scrape and
  the same statistics, index and readiness from every front-end, a front-end killed mid-request (restarted,
  its queued requests never run), the engine killed (the front-ends exit), SIGTERM reaching every process;
- ``test_representative_tests_pass_in_workers_mode``: a chosen subset of the existing server tests, run
  unchanged against ``--workers 2`` (``TENSORWIRE_TEST_WORKERS=2``, read by tests/serving.py). The whole
  suite runs that way with ``TENSORWIRE_TEST_WORKERS=2 pytest``; the default suite runs this subset only, to
  stay within its time: one test or two per behaviour the boundary could break, the cheap ones of each
  module (batching across connections, deadlines, cancellation, priorities, streams, errors and pushback,
  statistics, refusal counts, reload, drain, health, HTTP).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from infer_helpers import infer_request, outputs_of, sleeper_request
from model_factory import executed_ids, onnx_identity, sleeper_model
from polling import wait_for
from serving import WORKERS_ENV, call, running_server

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS
from tensorwire.server.workers import default_workers

WORKERS = ("--workers", "2")
#: each test channel gets its own connection (gRPC Python shares one between equal channels otherwise)
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def channel_to(server) -> grpc.Channel:
    """A channel with a TCP connection of its own (the kernel picks its front-end)."""
    options = [*OWN_CONNECTION, ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    channel = grpc.insecure_channel(server.address, options=options)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def infer_future(channel: grpc.Channel, request: pb.ModelInferRequest, timeout: float = 30):
    m = METHODS["ModelInfer"]
    stub = channel.unary_unary(
        m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
    )
    return stub.future(request, timeout=timeout)


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series ``name{labels}`` in a Prometheus text scrape (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def frontend_pids(server) -> list[int]:
    return [p.pid for p in psutil.Process(server.pid).children() if "frontend_process" in " ".join(p.cmdline())]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    onnx_identity(repo, name="identity", dims=[-1], max_batch_size=64)
    onnx_identity(repo, name="text", datatype="BYTES", dims=[-1], max_batch_size=8)
    onnx_identity(repo, name="spare", dims=[4], max_batch_size=8)
    sleeper_model(repo, max_batch_size=16, dynamic_batching={"max_queue_delay_us": 0})
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, *WORKERS, http=True) as srv:
        yield srv


def test_the_default_follows_the_cores():
    assert [default_workers(cores) for cores in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]


def test_tensors_of_every_size_and_kind_cross_intact(server):
    """Small and large (past the IPC's shared read buffer) numeric tensors, BYTES, unary and streamed."""
    rng = np.random.default_rng(0)
    small = rng.normal(size=(1, 16)).astype(np.float32)
    large = rng.normal(size=(2, 400_000)).astype(np.float32)  # 3.2 MB: read into a buffer of its own
    text = np.array([["héllo".encode(), b""], [b"x" * 70_000, b"world"]], dtype=object)
    channel = channel_to(server)
    with channel:
        for array in (small, large):
            answer = call(channel, "ModelInfer", infer_request("identity", {"INPUT0": array}))
            np.testing.assert_array_equal(outputs_of(answer)["OUTPUT0"], array)
        answer = call(channel, "ModelInfer", infer_request("text", {"INPUT0": text}))
        assert outputs_of(answer)["OUTPUT0"].tolist() == text.tolist()
        m = METHODS["ModelStreamInfer"]
        stream = channel.stream_stream(
            m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
        )
        requests = [infer_request("identity", {"INPUT0": a}, request_id=str(i)) for i, a in enumerate([large, small])]
        answers = list(stream(iter(requests), timeout=60))
    assert [a.infer_response.id for a in answers] == ["0", "1"]
    assert not any(a.error_message for a in answers)
    np.testing.assert_array_equal(outputs_of(answers[0].infer_response)["OUTPUT0"], large)


def test_a_batch_forms_from_connections_on_different_front_ends(server, repo):
    """16 connections (the kernel spreads them over both front-ends) queue while the replica is busy: the
    engine runs them as one batch."""
    channels = [channel_to(server) for _ in range(16)]
    before = scrape(server)
    try:
        blocker = infer_future(channels[0], sleeper_request(5000, sleep_ms=1500))
        assert wait_for(lambda: 5000 in executed_ids(repo / "sleeper.calls"), timeout_s=30)  # the replica is busy
        futures = [infer_future(ch, sleeper_request(5001 + i)) for i, ch in enumerate(channels)]
        answers = [f.result() for f in futures]
        blocker.result()
    finally:
        for channel in channels:
            channel.close()
    assert [a.id for a in answers] == [str(5001 + i) for i in range(16)]
    after = scrape(server)
    sent = [
        (sample(after, "tensorwire_frontend_requests_total", frontend=f) or 0)
        - (sample(before, "tensorwire_frontend_requests_total", frontend=f) or 0)
        for f in ("0", "1")
    ]
    assert sum(sent) == 17 and min(sent) > 0, f"requests per front-end: {sent}"
    calls = (repo / "sleeper.calls").read_text().splitlines()
    batches = [sorted(int(t) for t in line.split()) for line in calls if line.strip()]
    assert [5001 + i for i in range(16)] in batches, f"batches run: {batches[-4:]}"


def test_one_scrape_shows_the_engine_and_every_front_end(server):
    channels = [channel_to(server) for _ in range(8)]
    try:
        for channel in channels:
            call(channel, "ModelInfer", infer_request("spare", {"INPUT0": np.ones((1, 4), np.float32)}))
            with pytest.raises(grpc.RpcError):
                call(channel, "ModelInfer", infer_request("no-such-model", {"INPUT0": np.ones((1, 4), np.float32)}))
    finally:
        for channel in channels:
            channel.close()
    text = scrape(server)
    assert sample(text, "tensorwire_request_success_total", model="spare", version="1") >= 8
    assert sample(text, "tensorwire_request_refused_total", method="ModelInfer", reason="not_found") >= 8
    for frontend in ("0", "1"):
        assert sample(text, "tensorwire_frontend_process_cpu_seconds_total", frontend=frontend) > 0
        assert sample(text, "tensorwire_frontend_process_resident_memory_bytes", frontend=frontend) > 10 * 2**20
    assert sample(text, "tensorwire_frontend_restarts_total") == 0
    assert sample(text, "process_resident_memory_bytes") > 10 * 2**20  # the engine process's own
    # Each front-end releases its share once gRPC has sent the answer (a moment after the client has it).
    assert wait_for(lambda: sample(scrape(server), "tensorwire_inflight_bytes") == 0, timeout_s=5), "budget released"


def test_every_front_end_answers_as_one_server(server):
    """Statistics, the index and readiness read the same through every connection, right after a change."""
    channels = [channel_to(server) for _ in range(8)]
    try:
        call(channels[0], "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="spare"))
        assert not any(call(ch, "ModelReady", pb.ModelReadyRequest(name="spare")).ready for ch in channels)
        call(channels[0], "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="spare"))
        assert all(call(ch, "ModelReady", pb.ModelReadyRequest(name="spare")).ready for ch in channels)
        for i, channel in enumerate(channels):
            call(channel, "ModelInfer", infer_request("spare", {"INPUT0": np.full((2, 4), i, np.float32)}))
        counts = {
            call(ch, "ModelStatistics", pb.ModelStatisticsRequest(name="spare")).model_stats[0].inference_count
            for ch in channels
        }
        indexes = {str(call(ch, "RepositoryIndex", pb.RepositoryIndexRequest())) for ch in channels}
    finally:
        for channel in channels:
            channel.close()
    assert len(counts) == 1 and counts.pop() >= 16
    assert len(indexes) == 1


def test_a_killed_front_end_is_restarted_and_its_queued_requests_never_run(repo):
    with running_server(repo, *WORKERS) as server:
        log = repo / "sleeper.calls"
        before = set(executed_ids(log))

        def our_ports() -> set[int]:
            """Local ports of this process's connections to the server's gRPC port."""
            connections = psutil.Process().connections("tcp")
            return {c.laddr.port for c in connections if c.raddr and c.raddr.port == server.port}

        blocker_channel = channel_to(server)
        blocker_ports = our_ports()
        victim_channel = channel_to(server)  # connects at once: its own TCP connection
        blocker = infer_future(blocker_channel, sleeper_request(7000, sleep_ms=4000))
        assert wait_for(lambda: 7000 in executed_ids(log), timeout_s=10), "the blocker running"
        victims = [infer_future(victim_channel, sleeper_request(7001 + i)) for i in range(3)]
        # queued in the engine behind the blocker, so sent and owned by one front-end's connection
        assert wait_for(
            lambda: sample(scrape(server), "tensorwire_pending_requests", model="sleeper") == 3, timeout_s=10
        ), "the victims queued"
        # The front-end holding the victims' connection (not the blocker's, which may be another front-end):
        # its socket's peer is our end of that connection.
        ours = our_ports() - blocker_ports
        assert ours, "the victims' connection"
        owner = next(
            pid
            for pid in frontend_pids(server)
            for c in psutil.Process(pid).connections("tcp")
            if c.raddr and c.raddr.port in ours and c.laddr.port == server.port
        )
        os.kill(owner, signal.SIGKILL)
        for victim in victims:
            with pytest.raises(grpc.RpcError):
                victim.result()
        try:
            blocker.result()
        except grpc.RpcError:
            pass  # the blocker may have been on the killed front-end too
        assert wait_for(
            lambda: "event=frontend_exited" in server.log() and len(frontend_pids(server)) == 2, timeout_s=30
        ), "restart"
        assert wait_for(lambda: server.log().count("event=frontend_listening") >= 3, timeout_s=30), (
            "the new front-end listening"
        )
        with server.channel() as channel:
            assert call(channel, "ModelInfer", sleeper_request(7100)).id == "7100"
        executed = set(executed_ids(log)) - before
        assert 7100 in executed and not executed & {7001, 7002, 7003}
        assert "action=restart" in server.log()
        assert sample(scrape(server), "tensorwire_frontend_restarts_total") == 1
        blocker_channel.close()
        victim_channel.close()


def test_a_killed_engine_ends_every_front_end(repo):
    with running_server(repo, *WORKERS) as server:
        pids = frontend_pids(server)
        assert len(pids) == 2
        os.kill(server.pid, signal.SIGKILL)
        assert wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10), "front-ends exiting"
        assert "event=engine_lost" in server.log()


def test_sigterm_finishes_accepted_work_and_stops_every_process(repo):
    with running_server(repo, *WORKERS, "--drain-seconds", "0.2") as server:
        pids = frontend_pids(server)
        channel = channel_to(server)
        accepted = infer_future(channel, sleeper_request(8001, sleep_ms=800))
        assert wait_for(lambda: 8001 in executed_ids(repo / "sleeper.calls"), timeout_s=30)  # accepted, running
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert accepted.result().id == "8001"
        assert server.stop(sig=None, timeout=30) == 0
        assert time.monotonic() - started < 15
        assert wait_for(lambda: all(gone(pid) for pid in pids), timeout_s=10), "front-ends exiting"
        channel.close()
    log = server.log()
    assert "event=draining" in log and "event=stopped code=0" in log and "engine_lost" not in log


#: The subset of existing tests run against --workers 2 in the default suite (see the module docstring).
REPRESENTATIVE = [
    "tests/test_server_batching.py",  # rows in batches across 32 clients, deadlines, cancellation, priority
    "tests/test_server_streams.py::test_every_answer_echoes_its_request_id_errors_included",
    "tests/test_server_streams.py::test_requests_queued_when_the_stream_ends_never_run",
    "tests/test_server_streams.py::test_each_streamed_request_carries_the_calls_deadline",
    "tests/test_server_errors.py::test_unknown_model_and_version_are_not_found",
    "tests/test_server_errors.py::test_invalid_inputs_are_invalid_argument_with_a_useful_message",
    "tests/test_server_errors.py::test_full_queue_is_resource_exhausted_with_pushback_and_queued_work_completes",
    "tests/test_server_errors.py::test_backend_failure_is_internal_and_fails_only_that_request",
    "tests/test_server_errors.py::test_deadline_already_passed_and_cancel_are_reported",
    "tests/test_server_statistics.py::test_counts_cover_successful_work_only_and_every_failure_once_by_reason",
    "tests/test_server_statistics.py::test_refusals_before_a_model_resolves_are_counted_by_method_and_reason",
    "tests/test_server_ops.py::test_prometheus_metrics",
    "tests/test_server_ops.py::test_hot_reload_zero_failures",
    "tests/test_server_ops.py::test_health_follows_unload_and_load",
    "tests/test_server_health.py::test_live_but_not_ready_while_draining",
    "tests/test_server_shutdown.py",  # SIGTERM drains accepted requests and exits 0
    "tests/test_http_frontend.py::test_triton_http_client_infers_fp32",
    "tests/test_http_frontend.py::test_triton_http_client_repository_and_statistics",
    "tests/test_http_frontend.py::test_a_client_that_disconnects_cancels_its_queued_request",
]


@pytest.mark.slow
def test_representative_tests_pass_in_workers_mode(tmp_path):
    if os.environ.get(WORKERS_ENV):
        pytest.skip(f"{WORKERS_ENV} is set: every test already runs in workers mode")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t")]
        + REPRESENTATIVE,
        cwd=root,
        env={**os.environ, WORKERS_ENV: "2"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout.splitlines()[-1]
