"""Fixtures shared by several test modules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

PERF_ANALYZER = Path(__file__).resolve().parent.parent / "loadtest" / "perf_analyzer.sh"


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    """Triton's perf_analyzer via loadtest/perf_analyzer.sh; skips when it cannot be set up (no registry)."""
    try:
        done = subprocess.run([str(PERF_ANALYZER), "--setup-only"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip("perf_analyzer could not be set up within 300 s (slow or no network to the registry)")
    if done.returncode != 0:
        reason = done.stderr.strip()[-600:]
        pytest.skip(f"perf_analyzer could not be set up (needs pip/apt access once): {reason}")
    return PERF_ANALYZER
