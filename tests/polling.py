"""Waiting in tests for a condition that a server reaches on its own time (a load, a reload, a scrape)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(check: Callable[[], object], timeout_s: float = 20.0, interval_s: float = 0.1) -> bool:
    """Call ``check`` every ``interval_s`` seconds until it returns a true value (then True), or until
    ``timeout_s`` seconds have passed and a last call is false (then False): ``assert wait_for(...)``.
    Exceptions from ``check`` propagate."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return bool(check())
