"""A model that crashes, hangs or returns what its signature forbids takes nothing else down.

Real server subprocess, real gRPC; the Python models run in their own processes (python_stub)."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
from infer_helpers import infer_request, outputs_of
from model_factory import python_model
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb

MISBEHAVING = """
import os, sys, time
import numpy as np

class Model:
    def __init__(self):
        if os.path.exists({broken_marker!r}):
            raise RuntimeError("this model cannot start again")
    def execute(self, inputs):
        x = inputs["X"]
        time.sleep(0.2 if (x == 1).any() else 0.0)   # 1: hold the replica so the rest share a batch
        if (x == 13).any():
            sys.exit(3)
        if (x == 14).any():
            os._exit(9)
        if (x == 66).any():
            if {break_restart!r}:
                open({broken_marker!r}, "w").close()
            open({hung_marker!r}, "w").close()
            time.sleep(60)
        if (x == 7).any():
            return {{"Y": np.zeros((x.shape[0], 7), np.float32)}}
        if (x == 8).any():
            return {{"Y": np.array([["text"]] * x.shape[0])}}
        y = x.astype(np.int64) + 1
        if (x == 40).any():
            y[x[:, 0] == 40] = 2**40   # only the rows of request 40 overflow INT32
        return {{"Y": y}}
"""


def misbehaving(repo, name: str = "wild", break_restart: bool = False, **config) -> None:
    """X: FP32 [1] -> Y: INT32 [1] = X + 1; special inputs crash, hang or break the signature."""
    python_model(
        repo,
        name,
        MISBEHAVING.format(
            broken_marker=str(repo.parent / f"{name}.broken"),
            hung_marker=str(repo.parent / f"{name}.hung"),
            break_restart=break_restart,
        ),
        {
            "max_batch_size": 8,
            "warmup": "none",
            "instance_group": [{"kind": "cpu", "count": 1}],
            "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
            "outputs": [{"name": "Y", "datatype": "INT32", "dims": [1]}],
            "dynamic_batching": {"max_queue_delay_us": 0},
            **config,
        },
    )


def request(value: float, model: str = "wild") -> pb.ModelInferRequest:
    return infer_request(model, {"X": np.full((1, 1), value, np.float32)}, request_id=str(value))


def outcome(channel, value: float, model: str = "wild", timeout: float = 30):
    try:
        return int(outputs_of(call(channel, "ModelInfer", request(value, model), timeout=timeout))["Y"][0, 0])
    except grpc.RpcError as err:
        return err.code(), err.details()


def batch_with(channel, culprit: float, companions=(2, 3, 4)) -> dict:
    """Hold the replica with a 0.2 s request, then send the culprit and companions so they share a batch."""
    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(outcome, channel, 1)
        time.sleep(0.05)
        futures = {v: pool.submit(outcome, channel, v) for v in (culprit, *companions)}
        blocker.result()
        return {v: f.result() for v, f in futures.items()}


def test_exit_and_crash_cost_a_process_restart_not_the_replica(tmp_path):
    repo = tmp_path / "repo"
    misbehaving(repo)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        for culprit in (13, 14):  # sys.exit(3), os._exit(9)
            results = batch_with(ch, culprit)
            code, details = results.pop(culprit)
            assert code == grpc.StatusCode.INTERNAL and "wild:1" in details and "exited with code" in details
            assert results == {2: 3, 3: 4, 4: 5}, results
            assert outcome(ch, 5) == 6
            assert call(ch, "ModelReady", pb.ModelReadyRequest(name="wild")).ready
        assert server.process.poll() is None
    assert "event=backend_crashed" in server.log()


def test_outputs_are_checked_against_the_signature_per_request(tmp_path):
    repo = tmp_path / "repo"
    misbehaving(repo)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        code, details = outcome(ch, 7)
        assert code == grpc.StatusCode.INTERNAL and "shape [1, 7]" in details and "[-1, 1]" in details
        code, details = outcome(ch, 8)
        assert code == grpc.StatusCode.INTERNAL and "INT32" in details
        # One request's INT32 output holds 2**40: only that request fails, in the batch it shared.
        results = batch_with(ch, 40)
        code, details = results.pop(40)
        assert code == grpc.StatusCode.INTERNAL and "do not fit INT32" in details
        assert results == {2: 3, 3: 4, 4: 5}, results
        stats = call(ch, "ModelStatistics", pb.ModelStatisticsRequest(name="wild")).model_stats[0]
        assert any(b.batch_size >= 2 for b in stats.batch_stats)  # they did share a batch


def test_execution_timeout_fails_the_batch_and_replaces_the_replica(tmp_path):
    repo = tmp_path / "repo"
    misbehaving(repo, execution_timeout_s=1.0)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        started = time.monotonic()
        code, details = outcome(ch, 66)
        assert time.monotonic() - started < 5
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "execution_timeout_s" in details
        deadline = time.monotonic() + 20
        while not call(ch, "ModelReady", pb.ModelReadyRequest(name="wild")).ready:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert outcome(ch, 5) == 6
    assert "event=execution_timeout" in server.log() and "event=replica_replaced" in server.log()


def test_no_live_replica_shows_in_readiness_and_index(tmp_path):
    """The hung replica's replacement cannot start: not ready, and RepositoryIndex says why."""
    repo = tmp_path / "repo"
    misbehaving(repo, break_restart=True, execution_timeout_s=0.5)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        code, _ = outcome(ch, 66)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED

        def row():
            [entry] = [m for m in call(ch, "RepositoryIndex", pb.RepositoryIndexRequest()).models if m.name == "wild"]
            return entry

        deadline = time.monotonic() + 60  # until the replacement has failed to start
        while "cannot start again" not in row().reason:
            assert time.monotonic() < deadline, row()
            time.sleep(0.05)
        assert not call(ch, "ModelReady", pb.ModelReadyRequest(name="wild")).ready
        assert not call(ch, "ServerReady", pb.ServerReadyRequest()).ready
        assert row().state == "UNAVAILABLE" and "no live replica" in row().reason
        code, details = outcome(ch, 5)
        assert code == grpc.StatusCode.UNAVAILABLE and "no live replica" in details


def test_shutdown_and_unload_stay_within_grace_with_a_hung_model(tmp_path):
    repo = tmp_path / "repo"
    misbehaving(repo, name="hung_a")
    misbehaving(repo, name="hung_b")
    with running_server(repo, "--drain-seconds", "0.5", "--grace-seconds", "2") as server, server.channel() as ch:
        results = {}
        for name in ("hung_a", "hung_b"):
            thread = threading.Thread(target=lambda n=name: results.setdefault(n, outcome(ch, 66, model=n)))
            thread.start()
        deadline = time.monotonic() + 60  # both replicas hang in input 66 (each wrote its marker)
        while not all((repo.parent / f"{name}.hung").exists() for name in ("hung_a", "hung_b")):
            assert time.monotonic() < deadline, "the hung models never started input 66"
            time.sleep(0.02)
        started = time.monotonic()
        call(ch, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="hung_a"), timeout=30)
        assert time.monotonic() - started < 2 + 2.5  # the grace period, not the 60 s hang
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(30)
        elapsed = time.monotonic() - started
    assert code == 0 and elapsed < 0.5 + 2 + 3, f"exit {code} after {elapsed:.1f} s"
    assert results["hung_a"][0] == grpc.StatusCode.UNAVAILABLE
