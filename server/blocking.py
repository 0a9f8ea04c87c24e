"""Blocking work (model loads, session closes) in daemon threads, awaited from the event loop.

``asyncio.to_thread`` uses the loop's default executor, whose threads the interpreter joins at exit: a
model whose load or close never returns would then hold the process past its grace period. A daemon
thread per call is abandoned instead, and the caller's await can be bounded or shielded as it needs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("tensorwire.blocking")

T = TypeVar("T")


def run_blocking(
    fn: Callable[..., T],
    *args: Any,
    name: str = "tensorwire-blocking",
    on_orphan: Callable[[T], None] | None = None,
) -> asyncio.Future[T]:
    """Run ``fn(*args)`` in a new daemon thread; a future of its result (or exception) on this loop.

    Cancelling the future does not stop ``fn``. When ``fn`` returns after the future was cancelled or the
    loop has closed, ``on_orphan(result)`` runs in the thread (to release what ``fn`` built).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.cancelled():
            if ok and on_orphan is not None:
                threading.Thread(target=_orphan, args=(on_orphan, value), daemon=True).start()
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def work() -> None:
        try:
            ok, value = True, fn(*args)
        except BaseException as err:  # noqa: BLE001 - every outcome goes to the awaiting coroutine
            ok, value = False, err
        try:
            loop.call_soon_threadsafe(deliver, ok, value)
        except RuntimeError:  # the loop has closed (shutdown)
            if ok and on_orphan is not None:
                _orphan(on_orphan, value)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def _orphan(release: Callable[[Any], None], value: Any) -> None:
    try:
        release(value)
    except Exception:  # noqa: BLE001 - nobody is left to tell but the log
        log.exception("event=release_failed")
