"""``torch.export`` programs (.pt2) and AOTInductor packages: exported by the trainer, verified against
eager, published, and served through a real server with dynamic batching, giving the eager model's logits."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from serving import running_server  # noqa: E402
from trained_runs import quick_run  # noqa: E402

from tensorwire.client import InferenceClient  # noqa: E402
from tensorwire.repository import load_model_config, parse_model_config  # noqa: E402
from tensorwire.trainer.artifacts import load_trained, predict_torch  # noqa: E402
from tensorwire.trainer.config import ExportOptions, PublishOptions  # noqa: E402
from tensorwire.trainer.export import cxx_compiler, export  # noqa: E402
from tensorwire.trainer.publish import publish  # noqa: E402

pytestmark = pytest.mark.slow

FAST_STOP = ("--drain-seconds", "0")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small digits MLP exported as .pt2 and (where a C++ compiler exists) AOTInductor, both served."""
    root = tmp_path_factory.mktemp("pt2")
    run = quick_run(root / "run", "digits", "mlp", model_args={"hidden": [32, 32]})
    formats = ["pt2"] + (["aoti"] if cxx_compiler() else [])
    report = export(ExportOptions(run=str(run.root), formats=formats, verify_batch_sizes=[1, 5, 64]))
    repo = root / "models"
    for fmt in formats:
        publish(PublishOptions(run=str(run.root), repo=str(repo), max_queue_delay_us=2000), fmt=fmt, name=f"cnn_{fmt}")
    with running_server(repo, *FAST_STOP) as server:
        yield server, run, report, formats


def test_export_report_bounds_the_difference_from_eager(served):
    _, run, report, formats = served
    for fmt in formats:
        assert set(report[fmt]["max_abs_diff"]) == {"1", "5", "64"}
        assert max(report[fmt]["max_abs_diff"].values()) < 1e-4
    assert json.loads(run.export_report.read_text()) == report
    assert run.pt2.is_file() and run.pt2.stat().st_size > 0


def test_config_names_the_backend_and_platform(served):
    server, run, _, formats = served
    repo = run.root.parent / "models"
    config = load_model_config(repo / "cnn_pt2")
    assert config.backend == "torch_export" and config.model_filename == "model.pt2"
    assert config.platform == "pytorch_torch_export"
    assert parse_model_config({"backend": "aotinductor"}).platform == "pytorch_aotinductor"
    with InferenceClient(server.address) as client:
        for fmt in formats:
            backend = {"pt2": "torch_export", "aoti": "aotinductor"}[fmt]
            config = client.model_config(f"cnn_{fmt}")
            assert config.backend == backend and config.platform.startswith("pytorch_")


@pytest.mark.parametrize("fmt", ["pt2", "aoti"])
def test_served_logits_match_eager_at_any_batch_size(served, fmt):
    server, run, _, formats = served
    if fmt not in formats:
        pytest.skip("no C++ compiler: AOTInductor cannot compile here")
    model, _ = load_trained(run.best)
    rng = np.random.default_rng(1)
    with InferenceClient(server.address) as client:
        for batch in (1, 3, 64):
            x = rng.uniform(0, 1, size=(batch, 1, 8, 8)).astype(np.float32)
            got = client.infer(f"cnn_{fmt}", {"INPUT0": x})["OUTPUT0"]
            np.testing.assert_allclose(got, predict_torch(model, x), atol=1e-4)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(served):
    server, run, _, _ = served
    model, _ = load_trained(run.best)
    xs = [np.random.default_rng(i).uniform(0, 1, size=(1 + i % 3, 1, 8, 8)).astype(np.float32) for i in range(48)]
    with InferenceClient(server.address) as client:
        before = client.model_statistics("cnn_pt2")
        with ThreadPoolExecutor(16) as pool:
            outs = list(pool.map(lambda x: client.infer("cnn_pt2", {"INPUT0": x})["OUTPUT0"], xs))
        after = client.model_statistics("cnn_pt2")
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, predict_torch(model, x), atol=1e-4)

    def counts(stats):
        item = stats.model_stats[0]
        return item.inference_count, item.execution_count

    inferences = counts(after)[0] - counts(before)[0]
    executions = counts(after)[1] - counts(before)[1]
    assert inferences == sum(len(x) for x in xs)
    assert executions < len(xs)  # requests shared executions: the batcher works for this backend too
