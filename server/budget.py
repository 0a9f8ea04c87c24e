"""The server-wide budget for memory held by calls in flight.

Every inference request is charged its serialized size from the moment the server has read it until its
answer has been sent, and its answer's size from when the outputs are ready; a request that would take the
total past the limit is refused with RESOURCE_EXHAUSTED before it is parsed. A unary ModelInfer is not even
read while the budget is spent (HTTP/2 flow control then holds the caller's bytes on its side); messages
being read count as a large recent request each (the largest recent size, decaying by 10 % per request),
so a burst of calls cannot all start reading into an almost full budget. The budget lives on the event loop: no locks.

What it counts is message bytes; the process holds more per request while it is decoded, batched and
answered (see README, Security, for the measured ratio), so set the limit well below the memory you can
spare.
"""

from __future__ import annotations

import os
from pathlib import Path

from tensorwire.server.errors import ServingError

#: Floor of the default budget, so that a small container can still take one sizeable request.
MIN_DEFAULT_BYTES = 256 * 2**20


class MemoryBudgetError(ServingError):
    """A request refused because the in-flight memory budget is spent (RESOURCE_EXHAUSTED)."""

    status = "RESOURCE_EXHAUSTED"
    reason = "memory_budget"


def memory_limit_bytes() -> int | None:
    """The memory this process may use: its cgroup's limit (v2 ``memory.max`` or v1
    ``memory.limit_in_bytes``) when one is set, else the machine's physical memory; ``None`` if unknown."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 reports "no limit" as a huge number, v2 as "max"
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget_bytes() -> int:
    """A quarter of the memory this process may use (the models and the runtime need the rest), at least
    256 MiB; 4 GiB when the memory cannot be read."""
    limit = memory_limit_bytes()
    if limit is None:
        return 4 * 2**30
    return max(limit // 4, MIN_DEFAULT_BYTES)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


class InflightBudget:
    """Bytes held by calls in flight, against a limit (``--max-inflight-bytes``)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise ValueError(f"the in-flight memory budget must be positive, got {limit_bytes}")
        self.limit = limit_bytes
        self.in_use = 0
        self.reading = 0  # bytes expected from messages being read now (a typical size each)
        self.typical = 64 * 2**10  # the largest recent request size, decaying 10 % per request seen

    @property
    def spent(self) -> bool:
        """True when nothing more fits, counting messages being read: new unary calls are then refused
        before their message is read."""
        return self.in_use + self.reading >= self.limit

    def start_read(self) -> int:
        """A message is about to be read: count it as a large recent request until ``end_read``."""
        expected = int(self.typical)
        self.reading += expected
        return expected

    def end_read(self, expected: int, size: int | None) -> None:
        """The read counted by ``start_read`` is over (``size`` bytes, or None if nothing came)."""
        self.reading -= expected
        if size is not None:
            self.typical = max(size, 0.9 * self.typical)

    def acquire(self, n: int) -> None:
        """Charge ``n`` bytes; raises MemoryBudgetError (charging nothing) when they do not fit."""
        if self.in_use + n > self.limit:
            raise self.refusal(n)
        self.in_use += n

    def charge(self, n: int) -> None:
        """Charge ``n`` bytes that are already held (an answer's outputs), past the limit if need be."""
        self.in_use += n

    def release(self, n: int) -> None:
        """Give back ``n`` bytes charged by ``acquire`` or ``charge`` (the call's answer has been sent)."""
        self.in_use -= n

    def refusal(self, n: int | None = None) -> MemoryBudgetError:
        """The error for a request of ``n`` bytes (``None``: not read yet) that does not fit."""
        what = "this request" if n is None else f"this request of {_size(n)}"
        return MemoryBudgetError(
            f"the server is holding {_size(self.in_use)} for calls in flight and {what} would exceed its "
            f"memory budget of {_size(self.limit)} (tensorwire serve --max-inflight-bytes); retry shortly"
        )


class SharedBudget(InflightBudget):
    """One server-wide budget shared by several processes (``tensorwire serve --workers N``).

    ``slots`` is a writable buffer of one signed 64-bit count per process, in memory the processes share
    (a file each maps); this process writes only its own slot (``index``) and reads the sum of all of
    them, so no lock is needed: an aligned 8-byte store is atomic on the CPUs CPython runs on. Two
    processes that check at the same moment may together exceed the limit by at most one message each,
    as each admits against what the other had charged a moment before. ``reading`` and ``typical`` stay
    per process (they describe this process's reads).
    """

    def __init__(self, limit_bytes: int, slots: memoryview, index: int) -> None:
        self._slots = slots.cast("B").cast("q")
        self._index = index
        super().__init__(limit_bytes)

    @property
    def in_use(self) -> int:  # type: ignore[override]
        """Bytes held by every process sharing the budget."""
        return sum(self._slots)

    @in_use.setter
    def in_use(self, value: int) -> None:
        self._slots[self._index] = value

    @property
    def spent(self) -> bool:
        return sum(self._slots) + self.reading >= self.limit

    def acquire(self, n: int) -> None:
        if sum(self._slots) + n > self.limit:
            raise self.refusal(n)
        self._slots[self._index] += n

    def charge(self, n: int) -> None:
        self._slots[self._index] += n

    def release(self, n: int) -> None:
        self._slots[self._index] -= n
