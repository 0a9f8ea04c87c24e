"""One front-end process of ``tensorwire serve --workers N``: the gRPC and HTTP ports over a remote engine.

Started by the engine process (:mod:`tensorwire.server.workers`) as ``python -m
tensorwire.server.frontend_process``; its configuration arrives as one JSON line on standard input, and
standard input then stays open for as long as the engine process lives. End-of-file there, or the end of
its connection to the engine, means the engine process is gone: this process logs ``event=engine_lost`` and
exits 1 at once (what it could answer, it cannot run). It listens on the same ports as its siblings
(``SO_REUSEPORT``), validates and decodes requests in its own interpreter (its own GIL), and sends them to
the engine.

SIGINT and SIGTERM are ignored here: the engine process alone decides the drain (a terminal's Ctrl-C reaches
every process of the group), and tells each front-end when to close its ports (``STOP``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mmap
import os
import signal
import sys
from typing import Any

from tensorwire.server.budget import SharedBudget
from tensorwire.server.dataplane import DataPlane
from tensorwire.server.listeners import Listeners, ServerSettings, settings_from_dict
from tensorwire.server.remote_engine import RemoteEngine

log = logging.getLogger("tensorwire.frontend")

#: Exit status of a front-end that could not listen on its ports (the engine process ends the start-up).
EXIT_CANNOT_LISTEN = 3
#: Exit status of a front-end whose engine process is gone.
EXIT_ENGINE_LOST = 1


class FrontendProcess:
    """The listeners, data plane and remote engine of one front-end process (``config``: see ``workers``)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.settings: ServerSettings = settings_from_dict(config["settings"])
        self.index: int = config["index"]

    async def run(self) -> int:
        """Serve until the engine says stop (exit 0) or is gone (exit 1); 3 when a port cannot be bound."""
        loop = asyncio.get_running_loop()
        config = self.config
        stopped: asyncio.Future = loop.create_future()

        def stop(grace_s: float | None) -> None:
            if not stopped.done():
                stopped.set_result(grace_s)

        engine = RemoteEngine(loop, on_stop=stop, on_lost=lambda: stop(None))
        with open(config["budget_path"], "r+b") as file:
            shared = mmap.mmap(file.fileno(), 0)
        budget = SharedBudget(config["budget_limit"], memoryview(shared), self.index)
        dataplane = DataPlane(engine, budget, on_repository_change=lambda: listeners.sync_health())
        listeners = Listeners(self.settings, dataplane, config["max_message_bytes"], reuse_port=True)

        def apply_state() -> None:
            dataplane.started = engine.started
            dataplane.draining = engine.draining
            listeners.sync_health()

        engine.on_state = apply_state

        def parent_check() -> None:
            try:
                data = os.read(0, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(0)
                stop(None)

        loop.add_reader(0, parent_check)
        try:
            await engine.connect(config["socket"], self.index, os.getpid())
        except OSError as err:
            log.error("event=engine_lost action=exit detail='cannot connect to the engine process: %s'", err)
            return EXIT_ENGINE_LOST
        waiting = loop.create_task(engine.wait_state())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stopped.done():
            try:
                await listeners.start()
            except OSError as err:
                log.error("event=start_failed error=%r", str(err))
                print(f"tensorwire serve: error: {err}", file=sys.stderr, flush=True)
                return EXIT_CANNOT_LISTEN
            engine.listening()
            log.info("event=frontend_listening pid=%d", os.getpid())
        health = loop.create_task(self._health_loop(listeners))
        grace_s = await stopped
        health.cancel()
        if grace_s is None:
            engine.lost()
            log.error("event=engine_lost action=exit detail='the engine process is gone; this front-end exits'")
            return EXIT_ENGINE_LOST
        await listeners.stop(grace_s)
        engine.close()
        return 0

    @staticmethod
    async def _health_loop(listeners: Listeners) -> None:
        while True:
            await asyncio.sleep(1.0)
            listeners.sync_health()


def main() -> None:
    """Entry point: read the configuration line, serve, exit with the status ``run`` returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    config = json.loads(line)
    logging.basicConfig(
        level=config.get("log_level", "INFO"),
        stream=sys.stderr,
        format=f"ts=%(asctime)s level=%(levelname)s logger=%(name)s frontend={config['index']} %(message)s",
    )
    try:
        code = asyncio.run(FrontendProcess(config).run())
    except Exception:  # noqa: BLE001 - one line and a non-zero status; the engine process restarts us
        logging.getLogger("tensorwire.frontend").exception("event=frontend_failed")
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
