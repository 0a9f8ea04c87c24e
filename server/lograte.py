"""Log lines that anyone on the network can trigger, rate-limited per kind.

A flood of garbage messages must not become a flood of log lines: each kind of event is logged at most
once per interval, and the next line says how many were suppressed in between.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one line per ``kind`` every ``interval_s`` seconds (monotonic clock)."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval_s = interval_s
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> bool:
        """Log ``message % args`` with ``event=<kind>`` unless one was logged within the interval;
        returns whether it was logged."""
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._next[kind] = now + self._interval_s
        suppressed = self._suppressed.pop(kind, 0)
        self._log.warning("event=%s " + message + " suppressed_since_last=%d", kind, *args, suppressed)
        return True
