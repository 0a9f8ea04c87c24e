"""Waiting in tests for a condition that a server reaches on its own time (a load, a reload, a scrape)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    check: Callable[[], object],
    timeout_s: float = 20.0,
    interval_s: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> bool:
    """Call ``check`` every ``interval_s`` seconds until it returns a true value (then True), or until
    ``timeout_s`` seconds have passed and a last call is false (then False): ``assert wait_for(...), what``.
    An exception of a type in ``ignore`` (a port not open yet) counts as false; any other propagates."""

    def holds() -> bool:
        try:
            return bool(check())
        except ignore:
            return False

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if holds():
            return True
        time.sleep(interval_s)
    return holds()
