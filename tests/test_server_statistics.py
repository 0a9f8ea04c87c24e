"""Statistics mean what Triton's mean, survive reloads, agree with Prometheus, and count refusals.

Triton's definitions (its ModelStatistics message): inference_count counts the rows of successful
requests, execution_count successful model executions, queue/compute durations successful requests only;
every failure is counted once. Requests refused before a model resolves are counted by method and reason.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from infer_helpers import infer_request
from model_factory import onnx_identity, python_model
from ops_models import add_version_atomically
from polling import wait_for
from serving import call, running_server, scrape

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS

COUNTING_MODEL = """
import time
LOG = {log!r}

class Model:
    def execute(self, inputs):
        x = inputs["X"]
        with open(LOG, "a") as log:
            log.write(f"{{x.shape[0]}}\\n")
        if (x == 13).any():
            raise ValueError("13 is unlucky")
        time.sleep(0.15)
        return {{"Y": x + 1}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    repo = root / "models"
    log = root / "executions.log"
    for name in ("counted", "batched"):
        python_model(
            repo,
            name,
            COUNTING_MODEL.format(log=str(root / f"{name}.log")),
            {
                "max_batch_size": 8,
                "warmup": "none",
                "inputs": [{"name": "X", "datatype": "FP32", "dims": [1]}],
                "outputs": [{"name": "Y", "datatype": "FP32", "dims": [1]}],
                "instance_group": [{"kind": "cpu", "count": 1}],
                "dynamic_batching": {"max_queue_delay_us": 100_000},
            },
        )
    for name in ("reloaded", "unloaded", "rolled"):
        onnx_identity(repo, name, dims=[4], max_batch_size=8)
    with running_server(repo, "--drain-seconds", "0") as srv:
        srv.extra.update(repo=repo, root=root, log=log)
        yield srv


def executions(server, model: str) -> list[int]:
    path = Path(server.extra["root"]) / f"{model}.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def send(channel, model: str, rows: int, value: float = 1.0, datatype: str = "FP32") -> str:
    x = np.full((rows, 1), value, np.float32)
    message = infer_request(model, {"X": x})
    message.inputs[0].datatype = datatype
    try:
        call(channel, "ModelInfer", message, timeout=20)
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


def statistics(channel, model: str) -> pb.ModelStatistics:
    return call(channel, "ModelStatistics", pb.ModelStatisticsRequest(name=model)).model_stats[0]


def series(samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


def assert_prometheus_agrees(server, stats: pb.ModelStatistics) -> None:
    samples = scrape(server)
    labels = {"model": stats.name, "version": stats.version}
    inference = stats.inference_stats
    assert series(samples, "tensorwire_request_success_total", **labels) == inference.success.count
    assert series(samples, "tensorwire_request_failure_total", **labels) == inference.fail.count
    assert series(samples, "tensorwire_inference_count_total", **labels) == stats.inference_count
    assert series(samples, "tensorwire_execution_count_total", **labels) == stats.execution_count
    assert series(samples, "tensorwire_queue_duration_seconds_count", **labels) == inference.queue.count
    assert series(samples, "tensorwire_request_duration_seconds_count", **labels) == inference.success.count


def test_counts_cover_successful_work_only_and_every_failure_once_by_reason(server):
    sizes = [1, 3, 2, 4, 1, 1, 5, 2, 3, 1]
    with server.channel() as channel:
        with ThreadPoolExecutor(len(sizes)) as pool:
            codes = list(pool.map(lambda rows: send(channel, "counted", rows), sizes))
        assert codes == ["OK"] * len(sizes)
        bad = [
            send(channel, "counted", 1, datatype="INT32"),  # wrong datatype: refused by validation
            send(channel, "counted", 9),  # more rows than max_batch_size 8
            send(channel, "counted", 1, value=13.0),  # the model raises
        ]
        assert bad == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INTERNAL"]
        stats = statistics(channel, "counted")
    runs = executions(server, "counted")
    inference = stats.inference_stats
    assert inference.success.count == len(sizes)
    assert stats.inference_count == sum(sizes)  # rows of successful requests only
    assert stats.execution_count == len(runs) - 1  # the run that raised is not a successful execution
    assert inference.fail.count == 3
    assert inference.queue.count == inference.compute_infer.count == len(sizes)
    # batch_stats: every batch the model ran, the failed one included (it took compute time)
    assert sum(b.batch_size * b.compute_infer.count for b in stats.batch_stats) == sum(runs)
    assert stats.last_inference > 0
    samples = scrape(server)
    labels = {"model": "counted", "version": "1"}
    assert series(samples, "tensorwire_request_failure_total", reason="invalid_argument", **labels) == 2
    assert series(samples, "tensorwire_request_failure_total", reason="model_error", **labels) == 1
    assert_prometheus_agrees(server, stats)


def test_a_batch_rerun_request_by_request_counts_only_the_runs_that_worked(server):
    with server.channel() as channel:
        blocker = threading.Thread(target=send, args=(channel, "batched", 1))
        blocker.start()
        time.sleep(0.05)  # the replica is busy: the next four queue up and share a batch
        with ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(lambda v: send(channel, "batched", 1, value=v), [2.0, 13.0, 3.0, 4.0]))
        blocker.join()
        stats = statistics(channel, "batched")
    runs = executions(server, "batched")
    assert sorted(codes) == ["INTERNAL", "OK", "OK", "OK"]
    assert runs[1:] == [4, 1, 1, 1, 1], runs  # the batch of four failed, then each ran alone
    assert stats.inference_stats.success.count == 4 and stats.inference_stats.fail.count == 1
    assert stats.inference_count == 4
    assert stats.execution_count == 1 + 3  # the blocker and the three reruns that worked
    assert_prometheus_agrees(server, stats)


def test_statistics_survive_a_reload_of_the_same_version(server):
    request = infer_request("reloaded", {"INPUT0": np.ones((2, 4), np.float32)})
    with server.channel() as channel:
        for _ in range(5):
            call(channel, "ModelInfer", request)
        before = statistics(channel, "reloaded")
        call(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="reloaded"))
        after_reload = statistics(channel, "reloaded")
        assert after_reload.inference_count == before.inference_count == 10
        assert after_reload.inference_stats.success.count == 5
        assert_prometheus_agrees(server, after_reload)
        for _ in range(3):
            call(channel, "ModelInfer", request)
        later = statistics(channel, "reloaded")
    assert later.inference_stats.success.count == 8 and later.inference_count == 16
    assert_prometheus_agrees(server, later)


def test_series_of_an_unloaded_model_and_of_a_retired_version_are_removed(server):
    request = infer_request("unloaded", {"INPUT0": np.ones((1, 4), np.float32)})
    with server.channel() as channel:
        call(channel, "ModelInfer", request)
        assert series(scrape(server), "tensorwire_request_success_total", model="unloaded") == 1
        call(channel, "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="unloaded"))
        assert wait_for(lambda: not [k for k in scrape(server) if ("model", "unloaded") in k[1]])
        names = [s.name for s in call(channel, "ModelStatistics", pb.ModelStatisticsRequest()).model_stats]
        assert "unloaded" not in names

        rolled = infer_request("rolled", {"INPUT0": np.ones((1, 4), np.float32)})
        call(channel, "ModelInfer", rolled)
        add_version_atomically(server.extra["repo"], "rolled", onnx_identity, 2, dims=[4], max_batch_size=8)
        call(channel, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="rolled"))
        assert call(channel, "ModelInfer", rolled).model_version == "2"

        def version_one_gone() -> bool:
            keys = [k for k in scrape(server) if ("model", "rolled") in k[1]]
            return bool(keys) and not [k for k in keys if ("version", "1") in k[1]]

        assert wait_for(version_one_gone)


def test_refusals_before_a_model_resolves_are_counted_by_method_and_reason(server):
    before = scrape(server)
    with server.channel() as channel:
        ok = np.ones((1, 4), np.float32)
        for message in (
            infer_request("no_such_model", {"INPUT0": ok}),
            infer_request("reloaded", {"INPUT0": ok}, version="-1"),
            infer_request("reloaded", {"INPUT0": ok}, version="9"),
        ):
            with pytest.raises(grpc.RpcError):
                call(channel, "ModelInfer", message)
        raw = channel.unary_unary(METHODS["ModelInfer"].path)
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff" * 32, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(METHODS["ModelMetadata"].path)(b"\xff" * 32, timeout=5)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stream = channel.stream_stream(METHODS["ModelStreamInfer"].path)
        list(stream(iter([infer_request("no_such_model", {"INPUT0": ok}).SerializeToString()]), timeout=5))
    after = scrape(server)

    def delta(method: str, reason: str) -> float:
        name = "tensorwire_request_refused_total"
        return series(after, name, method=method, reason=reason) - series(before, name, method=method, reason=reason)

    assert delta("ModelInfer", "not_found") == 2  # unknown model, unknown version
    assert delta("ModelInfer", "invalid_argument") == 1  # version '-1'
    assert delta("ModelInfer", "malformed") == 1
    assert delta("ModelMetadata", "malformed") == 1
    assert delta("ModelStreamInfer", "not_found") == 1
