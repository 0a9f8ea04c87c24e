"""Run the locustfile headless in a subprocess and read the totals it writes (``--summary-json``).

Never import locust into a process that does anything else: importing it monkey-patches the standard
library for gevent, and threads in that process then run as greenlets. Benchmarks and tests therefore run
locust as a command, through :func:`run_headless`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def locust_command() -> Path:
    """The ``locust`` executable beside this interpreter (it may not exist without the loadtest extra)."""
    return Path(sys.executable).with_name("locust")


def run_headless(
    host: str,
    *args: str,
    users: int,
    seconds: float,
    workdir: Path,
    locustfile: Path = LOCUSTFILE,
    timeout_s: float | None = None,
) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess]:
    """``locust -f LOCUSTFILE --headless -u USERS -r USERS -t SECONDS --host HOST ARGS...`` in ``workdir``.

    ``args`` are more locust or locustfile options (``--model identity``, ``--stream``, ``--processes 2``).
    ``LOCUST_*`` variables of this environment are not passed on (they would override the options).
    Returns (the locustfile's summary: ``total``, ``entries``, ``errors``, ``stream``, ...; None when locust
    wrote none, e.g. it failed at start), and the finished process with its output. Raises
    subprocess.TimeoutExpired after ``timeout_s`` (default: the run's length + 60 s).
    """
    summary = Path(workdir) / "locust-summary.json"
    summary.unlink(missing_ok=True)
    command = [
        str(locust_command()),
        "-f",
        str(locustfile),
        "--headless",
        "-u",
        str(users),
        "-r",
        str(users),
        "-t",
        f"{seconds:g}s",
        "--host",
        host,
        "--summary-json",
        str(summary),
        "--only-summary",
        "--loglevel",
        "WARNING",
        *args,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s or seconds + 60, env=env, cwd=workdir
    )
    return (json.loads(summary.read_text()) if summary.exists() else None), done
