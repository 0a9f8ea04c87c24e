"""The compression table's one command, as a smoke run: every variant is built by the trainer's own
commands, measured in-process and through a real server, and lands in one markdown section."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.slow


def test_quick_run_builds_every_variant_and_writes_one_section(tmp_path):
    from tensorwire.trainer.bench_compression import compression_section

    section = compression_section(quick=True, family_keys=["cnn"], seconds=0.1, served_s=0.6, aoti=False, work=tmp_path)
    assert section.startswith("## Compression: what each technique buys")
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [
        "FP32 (ONNX)",
        "INT8 (static QDQ)",
        "pruned",
        "pruned + INT8",
        "distilled student",
        "torch.export (.pt2)",
    ]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 17
        assert all(re.fullmatch(r"[\d,.]+( MB| kB|x|%)?", cell) for cell in cells[1:]), row
    params = {label: int(row.split("|")[2].replace(",", "")) for label, row in zip(labels, rows, strict=True)}
    assert params["pruned"] < params["FP32 (ONNX)"] and params["distilled student"] < params["FP32 (ONNX)"]
    assert "- pruned + INT8 >= 3x FP32:" in section and "- served INT8 >= 1.3x FP32 at concurrency 64:" in section
    assert (tmp_path / "cnn-models").is_dir()  # the variants were published and served
