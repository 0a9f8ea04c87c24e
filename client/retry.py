"""When a failed call is retried, after how long, and how many retries the client may spend.

Safety first: a retry must never run an inference twice or hide a caller's
mistake. So only two situations are retried by default:

* ``UNAVAILABLE`` **before the request was sent**. gRPC reports a failure to
  *pick* a connection (no server reachable, name not resolvable) as
  ``UNAVAILABLE`` with a message from its load-balancing layer, such as
  ``failed to connect to all addresses`` (pick_first) or ``connections to all
  backends failing`` (round_robin), or from its resolver (``errors
  resolving``, ``DNS resolution failed``). Such an RPC never left the client.
  (RPCs that reached the wire but were refused before the server looked at
  them, e.g. on a GOAWAY, gRPC already retries transparently itself.) A
  connection lost *during* a call (``Socket closed``, ``Stream removed``) and
  a server that shuts down while running it (``Cancelling all calls``) are
  also ``UNAVAILABLE``, but the server may have run the request: never retried.
  An ``UNAVAILABLE`` answered *by the server* (model loading, server
  draining) is retried only with ``retry_server_unavailable=True``: tensorwire
  answers it only before executing anything, but other v2 servers may not
  promise that.
* ``RESOURCE_EXHAUSTED`` **with** ``grpc-retry-pushback-ms``: the server's queue
  was full and it said when to come back; the client waits exactly that long
  (gRPC's retry design, proposal A6). Without the hint (e.g. a message over the
  size limit) retrying cannot help, and a malformed or negative hint means "don't".

Everything else (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``DEADLINE_EXCEEDED``,
``INTERNAL``, ...) is raised at once. Retries share the call's one deadline:
no attempt and no back-off sleep extends it.

Back-off is exponential with jitter (``initial * multiplier**(n-1)``, capped,
then scaled by a random factor in ``[1 - jitter, 1]``) so that many clients
that failed together do not come back together. A :class:`RetryBudget` caps
retries to a fraction of recent requests, so a server that is down does not
get a retry storm from every client on top of the normal load.

Why these decisions are not left to gRPC's own retry policy (service config
``retryPolicy`` with ``retryThrottling``, which implements back-off, budgets and
pushback in the transport): its only criterion is the status code, and the two
codes worth retrying each mix safe and unsafe cases. With ``UNAVAILABLE``
retryable, grpcio 1.85 retried a call whose server was stopped while running it
(the request ran twice: tests/test_client_resilience.py shows the SDK does not)
and a server's "model is loading" answer; with ``RESOURCE_EXHAUSTED`` retryable,
it resent a request the server had refused without pushback (as it refuses a
message over its size limit), where retrying cannot help.
The transport does the rest of its part: reconnect back-off (channel options set
from this policy) and transparent retries of RPCs that never reached the server.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc

from tensorwire.client.errors import has_pushback_key, pushback_s

#: Status messages with which gRPC's LB policies and resolvers fail an RPC that never left the client.
NEVER_SENT_MARKERS: tuple[str, ...] = (
    "failed to connect to all addresses",  # pick_first
    "connections to all backends failing",  # round_robin
    "errors resolving",  # resolver (c-ares / native), grpc >= 1.60
    "DNS resolution failed",  # resolver, older wording
    "empty address list",
    "no addresses",
    "no ready subchannel",
)

#: Status messages gRPC gives when a connection broke after the request may have been sent.
CONNECTION_LOST_MARKERS: tuple[str, ...] = (
    "Socket closed",
    "Stream removed",
    "Connection reset",
    "Broken pipe",
    "GOAWAY",
    "Received RST_STREAM",
    "keepalive watchdog timeout",
    "Cancelling all calls",  # a gRPC server shutting down cancels the calls it is running
)


def never_sent(code: grpc.StatusCode | None, details: str | None) -> bool:
    """True when the failure is gRPC's own "no connection to send it on" (the RPC never left)."""
    if code is not grpc.StatusCode.UNAVAILABLE or not details:
        return False
    return any(marker in details for marker in NEVER_SENT_MARKERS)


def connection_lost(code: grpc.StatusCode | None, details: str | None) -> bool:
    """True when a connection broke mid-call: the server may have executed the request."""
    if code is not grpc.StatusCode.UNAVAILABLE or not details:
        return False
    return any(marker in details for marker in CONNECTION_LOST_MARKERS)


class RetryBudget:
    """At most ``ratio`` retries per request, plus ``min_per_second``, over the last ``window_s`` seconds.

    Counted in one-second buckets (constant time and memory per call); thread-safe.
    ``min_per_second`` lets a quiet client still retry a little; ``ratio`` keeps a busy
    client from multiplying its load when the server struggles.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        min_per_second: float = 5.0,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window_s <= 0:
            raise ValueError("RetryBudget needs ratio >= 0, min_per_second >= 0 and window_s > 0")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self._slots = max(1, math.ceil(window_s))
        self._clock = clock
        self._lock = threading.Lock()
        self._second = [-(2**62)] * self._slots
        self._requests = [0] * self._slots
        self._retries = [0] * self._slots

    def _slot(self, second: int) -> int:
        index = second % self._slots
        if self._second[index] != second:
            self._second[index] = second
            self._requests[index] = 0
            self._retries[index] = 0
        return index

    def record_request(self) -> None:
        """Count one call (not its retries) towards the budget."""
        second = math.floor(self._clock())
        with self._lock:
            self._requests[self._slot(second)] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) when it is spent."""
        second = math.floor(self._clock())
        with self._lock:
            index = self._slot(second)
            oldest = second - self._slots
            requests = retries = 0
            for slot in range(self._slots):
                if self._second[slot] > oldest:
                    requests += self._requests[slot]
                    retries += self._retries[slot]
            if retries >= self.ratio * requests + self.min_per_second * self._slots:
                return False
            self._retries[index] += 1
            return True


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries; see the module docstring for what is retried and why.

    ``max_attempts`` counts the first try (1 disables retries). Back-off for attempt
    ``n`` is ``min(max_backoff, initial_backoff * multiplier**(n-1))`` seconds times a
    random factor in ``[1 - jitter, 1]`` (``initial_backoff`` and ``max_backoff`` are
    seconds; ``jitter`` a fraction). The budget is ``budget_ratio`` retries per request
    plus ``budget_min_per_second`` over ``budget_window_s`` seconds, per client.
    ``retry_server_unavailable`` also retries UNAVAILABLE answered by the server (loading,
    draining). ``initial_backoff`` and ``max_backoff`` also set the channel's reconnect
    back-off (at least 0.1 s and 1 s).

    Raises ValueError for ``max_attempts`` < 1, negative or inverted back-offs, a
    multiplier below 1 or a jitter outside [0, 1].
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    retry_server_unavailable: bool = False
    budget_ratio: float = 0.2
    budget_min_per_second: float = 5.0
    budget_window_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 (1 disables retries)")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter is a fraction in [0, 1]")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        """A policy that never retries."""
        return cls(max_attempts=1)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(0, attempt - 1))
        factor = 1.0 - self.jitter * (rng or random).random()
        return base * factor


class Retrier:
    """A policy plus its per-client state (budget, randomness, counters).

    ``next_delay`` is pure decision logic (no sleeping), so it is unit-tested with a
    fake clock; the sync and asyncio clients each run the loop with their own sleep.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.rng = rng or random.Random()
        self.budget = RetryBudget(
            policy.budget_ratio, policy.budget_min_per_second, policy.budget_window_s, clock=clock
        )
        #: Retries performed by this client so far (observability and tests).
        self.retries = 0

    def retryable(
        self, code: grpc.StatusCode | None, details: str | None, trailing: Iterable[tuple[str, str | bytes]]
    ) -> bool:
        """Whether this failure is of a kind that is safe to retry at all."""
        if code is grpc.StatusCode.UNAVAILABLE:
            if never_sent(code, details):
                return True
            return self.policy.retry_server_unavailable and not connection_lost(code, details)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            return pushback_s(trailing) is not None
        return False

    def next_delay(
        self,
        code: grpc.StatusCode | None,
        details: str | None,
        trailing: Iterable[tuple[str, str | bytes]],
        attempt: int,
        deadline: float | None,
    ) -> float | None:
        """Seconds to sleep before attempt ``attempt + 1``, or ``None`` to give up and raise.

        Gives up when the failure is not retryable, attempts or budget are spent, or the
        sleep would end past ``deadline`` (a ``clock()`` value; ``None`` = no deadline).
        """
        if attempt >= self.policy.max_attempts:
            return None
        trailing = tuple(trailing)
        if not self.retryable(code, details, trailing):
            return None
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            delay = pushback_s(trailing)
            if delay is None or not has_pushback_key(trailing):
                return None
        else:
            delay = self.policy.backoff(attempt, self.rng)
        if deadline is not None and self.clock() + delay >= deadline:
            return None
        if not self.budget.try_spend():
            return None
        self.retries += 1
        return delay

    def deadline(self, timeout: float | None) -> float | None:
        """The ``clock()`` value at which a call with ``timeout`` seconds must be over."""
        return None if timeout is None else self.clock() + timeout

    def remaining(self, deadline: float | None) -> float | None:
        """Seconds left until ``deadline`` (at least a millisecond, so gRPC still gets a deadline)."""
        if deadline is None:
            return None
        return max(deadline - self.clock(), 0.001)
