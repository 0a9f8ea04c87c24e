"""The in-process ONNX Runtime ceiling tool: consistent numbers on a tiny model."""

from __future__ import annotations

import json

import pytest

from tensorwire.loadtest import ceiling
from tensorwire.loadtest.reference_models import build_identity


@pytest.fixture(scope="module")
def identity_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ceiling") / "identity" / "1" / "model.onnx"
    build_identity(path)
    return path


def test_measure_ceiling_rows_are_consistent(identity_model):
    rows = ceiling.measure_ceiling(identity_model, [1, 8], [1], seconds=0.1, replicas=[1, 2], repeats=2, warmup_s=0.02)
    assert [(r["threads"], r["replicas"], r["batch_size"]) for r in rows] == [
        (1, 1, 1),
        (1, 1, 8),
        (1, 2, 1),
        (1, 2, 8),
    ]
    for row in rows:
        assert row["model"] == "identity"
        assert row["calls"] > 10 and row["repeats"] == 2
        assert row["samples_per_s"] == pytest.approx(row["batches_per_s"] * row["batch_size"])
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"]
        # a closed loop: throughput x latency ~ replicas (Little's law), loosely
        assert row["batches_per_s"] * row["latency_ms_p50"] / 1e3 <= row["replicas"] * 1.5


def test_cli_markdown_and_json(identity_model, tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert (
        ceiling.main(
            [
                "--model",
                str(identity_model),
                "--batch-sizes",
                "1,4",
                "--threads",
                "1",
                "--seconds",
                "0.05",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.startswith("| model | threads | replicas | batch |")
    assert table.count("\n| identity | 1 | 1 |") == 2
    rows = json.loads(out.read_text())
    assert [r["batch_size"] for r in rows] == [1, 4]


def test_cli_rejects_bad_sizes(identity_model):
    with pytest.raises(SystemExit):
        ceiling.main(["--model", str(identity_model), "--batch-sizes", "0,4"])
