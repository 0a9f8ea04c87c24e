"""``tensorwire`` commands run as a user runs them: a fresh interpreter, a timeout (a DDP hang must fail the
test, not stall the suite), output captured; and the small digits-CNN recipe the trainer tests train with."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    *args: str, timeout: float = 300, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``tensorwire ARGS`` (``python -m tensorwire.cli``) with ``env`` added to this process's environment;
    raises subprocess.TimeoutExpired after ``timeout`` seconds."""
    return subprocess.run(
        [sys.executable, "-m", "tensorwire.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def run_cli_ok(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``run_cli`` that fails the test, showing the command's output, unless it exits 0."""
    result = run_cli(*args, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def digits_cnn(width: int) -> list[str]:
    """Flags for the digits CNN of ``width`` channels trained by 2 DDP processes (add epochs, run, ...)."""
    return ["--data", "digits", "--model", "cnn", "--model-arg", f"width={width}", "--nproc-per-node", "2"]
