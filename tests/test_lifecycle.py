"""Lifecycle work does not depend on the caller; SIGTERM at any moment; strict readiness.

Every test runs the real server as a subprocess and talks real gRPC (tests/serving.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from infer_helpers import infer_request
from model_factory import onnx_identity, python_model
from ops_models import garbage_onnx
from polling import wait_for
from serving import call, running_server

from tensorwire.proto import inference_pb2 as pb

OK = grpc.StatusCode.OK

SLOW_INIT = """
import time
class Model:
    def __init__(self):
        time.sleep({init_s})
    def execute(self, inputs):
        with open({starts!r}, "a") as log:
            log.write("started\\n")
        time.sleep(float(inputs["INPUT0"].max()) / 1000.0)  # INPUT0 holds milliseconds to sleep
        return {{"OUTPUT0": inputs["INPUT0"]}}
    def close(self):
        with open({closes!r}, "a") as log:
            log.write("closed\\n")
"""


def slow_model(repo: Path, name: str, init_s: float = 0.0, count: int = 1) -> Path:
    """A Python model that takes ``init_s`` to build, sleeps INPUT0 ms per run, logs each close()."""
    closes = Path(repo).parent / f"{name}.closes"
    python_model(
        repo,
        name,
        SLOW_INIT.format(init_s=init_s, closes=str(closes), starts=str(starts_of(repo, name))),
        {
            "max_batch_size": 8,
            "warmup": "none",
            "instance_group": [{"kind": "cpu", "count": count}],
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "dims": [1]}],
        },
    )
    return closes


def starts_of(repo: Path, name: str) -> Path:
    """The file where the slow model ``name`` logs each run it starts (before it sleeps)."""
    return Path(repo).parent / f"{name}.starts"


def running(repo: Path, name: str, count: int = 1) -> bool:
    """Wait until the slow model ``name`` has started ``count`` runs; False after 20 s."""
    starts = starts_of(repo, name)
    return wait_for(lambda: starts.exists() and starts.read_text().count("started") >= count)


def sleep_request(model: str, ms: float = 0.0) -> pb.ModelInferRequest:
    return infer_request(model, {"INPUT0": np.full((1, 1), ms, np.float32)})


def index(channel, name: str) -> dict[str, tuple[str, str]]:
    rows = call(channel, "RepositoryIndex", pb.RepositoryIndexRequest()).models
    return {m.version: (m.state, m.reason) for m in rows if m.name == name}


def wait_live(channel) -> None:
    assert wait_for(lambda: code_of(lambda: call(channel, "ServerLive", pb.ServerLiveRequest(), timeout=1)) == OK)


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_load_outlives_its_callers_timeout(tmp_path):
    """A load whose caller gives up after 0.5 s still completes: READY, not LOADING for good."""
    repo = tmp_path / "repo"
    onnx_identity(repo, "other", dims=[4], max_batch_size=8)
    slow_model(repo, "slow", init_s=2.0)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        call(ch, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="slow"), timeout=30)
        assert index(ch, "slow")["1"][0] == "UNAVAILABLE"
        load = pb.RepositoryModelLoadRequest(model_name="slow")
        assert code_of(lambda: call(ch, "RepositoryModelLoad", load, timeout=0.5)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert index(ch, "slow")["1"][0] == "LOADING"
        assert wait_for(lambda: index(ch, "slow")["1"] == ("READY", "")), index(ch, "slow")
        assert call(ch, "ModelInfer", sleep_request("slow")).model_name == "slow"
        assert call(ch, "ServerReady", pb.ServerReadyRequest()).ready


def test_unload_outlives_its_callers_timeout(tmp_path):
    """An unload whose caller gives up while a request still runs ends UNAVAILABLE, not UNLOADING."""
    repo = tmp_path / "repo"
    closes = slow_model(repo, "busy")
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        caller = threading.Thread(target=lambda: call(ch, "ModelInfer", sleep_request("busy", 1500), timeout=30))
        caller.start()
        assert running(repo, "busy")
        unload = pb.RepositoryModelUnloadRequest(model_name="busy")
        assert code_of(lambda: call(ch, "RepositoryModelUnload", unload, timeout=0.3)) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        caller.join(30)
        assert wait_for(lambda: index(ch, "busy")["1"] == ("UNAVAILABLE", "unloaded")), index(ch, "busy")
        assert wait_for(lambda: closes.exists() and closes.read_text().count("closed") == 1)
        assert call(ch, "ServerReady", pb.ServerReadyRequest()).ready  # unloaded on request: still ready


def test_unload_during_first_load_wins(tmp_path):
    """An unload asked for while a model's first load runs: the model ends unloaded, never READY."""
    repo = tmp_path / "repo"
    onnx_identity(repo, "other", dims=[4], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        slow_model(repo, "late", init_s=2.0)
        outcome: dict[str, grpc.StatusCode] = {}
        load = pb.RepositoryModelLoadRequest(model_name="late")
        loader = threading.Thread(
            target=lambda: outcome.setdefault(
                "load", code_of(lambda: call(ch, "RepositoryModelLoad", load, timeout=30))
            )
        )
        loader.start()
        assert wait_for(lambda: index(ch, "late").get("1", ("",))[0] == "LOADING")
        call(ch, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="late"), timeout=30)
        loader.join(30)
        assert outcome["load"] == grpc.StatusCode.UNAVAILABLE  # the load was rolled back
        assert index(ch, "late")["1"] == ("UNAVAILABLE", "unloaded")
        time.sleep(0.5)
        assert not call(ch, "ModelReady", pb.ModelReadyRequest(name="late")).ready
        assert index(ch, "late")["1"][0] == "UNAVAILABLE"


def test_load_while_draining_is_refused_and_failed_load_is_logged(tmp_path):
    repo = tmp_path / "repo"
    onnx_identity(repo, "good", dims=[4], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "3", "--grace-seconds", "5") as server, server.channel() as ch:
        garbage_onnx(repo, "broken")
        load = pb.RepositoryModelLoadRequest(model_name="broken")
        assert code_of(lambda: call(ch, "RepositoryModelLoad", load, timeout=30)) == grpc.StatusCode.FAILED_PRECONDITION
        assert "event=load_failed model=broken" in server.log()  # the reason reaches the server log
        onnx_identity(repo, "newcomer", dims=[4], max_batch_size=8)
        server.process.send_signal(signal.SIGTERM)
        assert wait_for(lambda: not call(ch, "ServerReady", pb.ServerReadyRequest()).ready)  # draining
        newcomer = pb.RepositoryModelLoadRequest(model_name="newcomer")
        assert code_of(lambda: call(ch, "RepositoryModelLoad", newcomer, timeout=30)) == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(30) == 0
    assert "event=loaded model=newcomer" not in server.log()


def test_sigterm_during_startup_load_exits_within_grace(tmp_path):
    """A model that takes 30 s to build must not hold a SIGTERM at start-up."""
    repo = tmp_path / "repo"
    slow_model(repo, "glacial", init_s=30.0)
    with running_server(repo, "--drain-seconds", "0", "--grace-seconds", "2", wait=False) as server:
        with server.channel() as ch:
            assert wait_for(
                lambda: (
                    code_of(lambda: call(ch, "ServerLive", pb.ServerLiveRequest(), timeout=1)) == (grpc.StatusCode.OK)
                )
            )
            assert not call(ch, "ServerReady", pb.ServerReadyRequest()).ready  # strict: still loading
            assert index(ch, "glacial")["1"][0] == "LOADING"
        time.sleep(1.0)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(20)
        elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 2 + 4, f"exited {elapsed:.1f} s after SIGTERM"


def test_unload_racing_shutdown_closes_each_replica_once(tmp_path):
    repo = tmp_path / "repo"
    closes = slow_model(repo, "pair", count=2)
    with running_server(repo, "--drain-seconds", "0", "--grace-seconds", "10") as server, server.channel() as ch:
        caller = threading.Thread(
            target=lambda: code_of(lambda: call(ch, "ModelInfer", sleep_request("pair", 2000), timeout=30))
        )
        caller.start()
        assert running(repo, "pair")
        unload = threading.Thread(
            target=lambda: code_of(
                lambda: call(ch, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="pair"))
            )
        )
        unload.start()
        assert wait_for(lambda: index(ch, "pair")["1"][0] == "UNLOADING")  # waiting for the running request
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        caller.join(10)
        unload.join(10)
    assert closes.read_text().count("closed") == 2  # two replicas, each closed exactly once


def test_strict_readiness_waits_for_every_model(tmp_path):
    repo = tmp_path / "repo"
    onnx_identity(repo, "good", dims=[4], max_batch_size=8)
    garbage_onnx(repo, "broken")
    with running_server(repo, "--drain-seconds", "0", wait=False) as server, server.channel() as ch:
        wait_live(ch)
        assert wait_for(lambda: index(ch, "broken").get("", ("",))[0] == "UNAVAILABLE")
        assert wait_for(lambda: call(ch, "ModelReady", pb.ModelReadyRequest(name="good")).ready)
        assert not call(ch, "ServerReady", pb.ServerReadyRequest()).ready  # a model failed to load
        # why, in one WARNING line at the end of start-up: the model, its state and reason, the way out
        assert wait_for(lambda: "event=not_ready" in server.log())
        (line,) = [line for line in server.log().splitlines() if "event=not_ready" in line]
        assert "level=WARNING" in line and "broken:UNAVAILABLE (" in line and "good" not in line.split("detail")[0]
        assert "--no-strict-readiness" in line
        # and from the client's side: tensorwire health lists what is not ready, with the reason
        health = subprocess.run(
            [sys.executable, "-m", "tensorwire.cli", "health", "-a", server.address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 1 and "ready=no" in health.stdout, health.stdout + health.stderr
        assert "not ready: model broken: UNAVAILABLE: " in health.stdout and "model good" not in health.stdout
        assert "--no-strict-readiness" in health.stdout
        call(ch, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="broken"))
        assert call(ch, "ServerReady", pb.ServerReadyRequest()).ready  # unloaded on request: not waited for
    with running_server(repo, "--drain-seconds", "0", "--no-strict-readiness") as server, server.channel() as ch:
        assert call(ch, "ServerReady", pb.ServerReadyRequest()).ready
        assert index(ch, "broken")[""][0] == "UNAVAILABLE"
        assert wait_for(lambda: "event=ready " in server.log()) and "event=not_ready" not in server.log()


def test_poll_repairs_after_the_repository_disappears(tmp_path):
    """--poll keeps running through a vanished repository and loads the models again when it is back."""
    repo = tmp_path / "repo"
    onnx_identity(repo, "polled", dims=[4], max_batch_size=8)
    moved = tmp_path / "elsewhere"
    with running_server(repo, "--poll", "0.3", "--drain-seconds", "0") as server, server.channel() as ch:
        repo.rename(moved)
        assert wait_for(lambda: not call(ch, "ModelReady", pb.ModelReadyRequest(name="polled")).ready), server.log()
        moved.rename(repo)
        (repo / "polled" / "config.toml").touch()
        assert wait_for(lambda: call(ch, "ModelReady", pb.ModelReadyRequest(name="polled")).ready), server.log()
        request = infer_request("polled", {"INPUT0": np.ones((1, 4), np.float32)})
        assert call(ch, "ModelInfer", request).model_name == "polled"


@pytest.mark.parametrize("timeout", [0.3])
def test_load_timeout_then_reload_is_serialized(tmp_path, timeout):
    """Two loads of the same model, the first abandoned by its caller: both complete in order, one READY row."""
    repo = tmp_path / "repo"
    onnx_identity(repo, "other", dims=[4], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as server, server.channel() as ch:
        slow_model(repo, "twice", init_s=1.0)
        load = pb.RepositoryModelLoadRequest(model_name="twice")
        assert code_of(lambda: call(ch, "RepositoryModelLoad", load, timeout=timeout)) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        call(ch, "RepositoryModelLoad", load, timeout=30)
        assert index(ch, "twice") == {"1": ("READY", "")}
