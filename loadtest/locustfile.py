"""Locust load test for tensorwire (or any Open Inference Protocol v2 gRPC server), through the SDK.

    locust -f loadtest/locustfile.py --headless -u 64 -r 16 -t 30s \\
        --host 127.0.0.1:8001 --model identity [--batch-size 1] [--input-shape 16] [--datatype FP32]

Every simulated user calls ``InferenceClient.infer`` in a closed loop (``--think-time`` seconds
between calls, 0 by default) and reports each call to locust as a request event: type ``grpc``,
name = the model, response time in ms, response length = bytes of the returned tensors, and the
SDK's exception (``InferenceServerError`` subclasses, e.g. ``ServerBusyError``) on failure.

With ``--stream`` each user instead opens one ``ModelStreamInfer`` stream (``InferenceClient.stream``)
and sends its requests on it, one at a time: the fast path (a Python server answers about twice as
many requests per second over a stream as over unary calls, because per-call set-up dominates). Those
events have type ``grpc-stream``. A user whose stream breaks (or whose request times out on it) opens a new one.

Options (also as environment variables ``LOCUST_MODEL``, ``LOCUST_BATCH_SIZE``, ... or in a locust
config file, like every locust option):

``--host``            the server, ``host:port`` (``grpc://`` prefix allowed; ``grpcs://`` = TLS with the
                      system's roots). Default 127.0.0.1:8001.
``--model``           model name (required); ``--model-version`` to pin a version.
``--batch-size``      rows per request for models with a batch dimension (default 1).
``--input-shape``     per-sample shape without the batch dimension, e.g. ``3,32,32`` (default: the
                      model's metadata, variable dimensions as 1); applies to every input.
``--datatype``        override the input datatype (default: the model's metadata).
``--request-timeout`` seconds per call (default 30).
``--think-time``      seconds each user waits between calls (default 0: closed loop).
``--stream``          send over one ModelStreamInfer stream per user instead of unary calls.
``--connection-per-user``  give every user its own HTTP/2 connection (default: one per locust process,
                      shared by its users, as one application would).
``--summary-json``    at the end, write the final totals (requests, failures, req/s, percentiles) as
                      JSON to this file, from the master or the single process. Locust's ``--csv`` files
                      are rewritten only once a second, so they miss the last second of a run.

gevent: locust runs users as gevent greenlets in one OS thread. A blocking grpcio call that is not
gevent-aware blocks that whole thread, so users would run one at a time and locust would time
nothing but the gaps (the "0 ms latency" trap). ``grpc.experimental.gevent.init_gevent()`` makes grpcio
cooperate; it must run after gevent's monkey-patching (done when locust is imported) and before any
gRPC channel exists, in every process. It runs below at import; channels are created in ``on_start``,
so ``--processes N`` (which forks after importing this file) gets a fresh channel in each worker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import locust  # noqa: F401  (imported first: it monkey-patches the standard library for gevent)
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()  # before any channel exists; see the module docstring

from locust import User, between, constant, events, task  # noqa: E402

from tensorwire.client import InferenceClient, InferenceServerError, RetryPolicy  # noqa: E402
from tensorwire.loadtest._inputs import parse_shape, request_inputs  # noqa: E402

DEFAULT_HOST = "127.0.0.1:8001"


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    group = parser.add_argument_group("tensorwire", "what each simulated user sends")
    group.add_argument("--model", env_var="LOCUST_MODEL", default="", help="model to call (required)")
    group.add_argument(
        "--model-version",
        env_var="LOCUST_MODEL_VERSION",
        default="",
        help="model version (default: the server's choice)",
    )
    group.add_argument(
        "--batch-size",
        env_var="LOCUST_BATCH_SIZE",
        type=int,
        default=1,
        help="rows per request for batched models (default 1)",
    )
    group.add_argument(
        "--input-shape",
        env_var="LOCUST_INPUT_SHAPE",
        default="",
        help="per-sample input shape without the batch dimension, e.g. 3,32,32 (default: from the model's metadata)",
    )
    group.add_argument(
        "--datatype",
        env_var="LOCUST_DATATYPE",
        default="",
        help="input datatype, e.g. FP32 (default: from the model's metadata)",
    )
    group.add_argument(
        "--request-timeout",
        env_var="LOCUST_REQUEST_TIMEOUT",
        type=float,
        default=30.0,
        help="deadline per call in seconds (default 30)",
    )
    group.add_argument(
        "--think-time",
        env_var="LOCUST_THINK_TIME",
        type=float,
        default=0.0,
        help="seconds each user waits between calls (default 0: closed loop)",
    )
    group.add_argument(
        "--stream",
        env_var="LOCUST_STREAM",
        action="store_true",
        default=False,
        help="send over one ModelStreamInfer stream per user (the fast path) instead of unary calls",
    )
    group.add_argument(
        "--connection-per-user",
        env_var="LOCUST_CONNECTION_PER_USER",
        action="store_true",
        default=False,
        help="one HTTP/2 connection per user instead of one per process",
    )
    group.add_argument(
        "--summary-json",
        env_var="LOCUST_SUMMARY_JSON",
        default="",
        help="write the final totals as JSON to this file when the run ends",
    )


def parse_target(host: str | None) -> tuple[str, bool]:
    """locust's --host as (gRPC target, tls): ``grpc://h:p`` / ``grpcs://h:p`` / ``h:p``."""
    host = (host or "").strip() or DEFAULT_HOST
    tls = False
    for scheme, secure in (("grpcs://", True), ("https://", True), ("grpc://", False), ("http://", False)):
        if host.startswith(scheme):
            host, tls = host[len(scheme) :], secure
            break
    return host.rstrip("/"), tls


# One client per process (created lazily in on_start, after any --processes fork) shared by the
# users of that process; keyed by pid so a forked child never reuses its parent's channel.
_shared: dict[int, InferenceClient] = {}


def _client(target: str, tls: bool, own_connection: bool) -> InferenceClient:
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []

    # Retries off: a load test must see (and count) every failure, not hide it behind a retry.
    def make() -> InferenceClient:
        return InferenceClient(target, tls=tls or None, retry=RetryPolicy.disabled(), options=options)

    if own_connection:
        return make()
    pid = os.getpid()
    client = _shared.get(pid)
    if client is None:
        client = _shared[pid] = make()
    return client


_environment = []  # the locust Environment, kept by the init listener for the quit listener


@events.init.add_listener
def _check_options(environment, **_kwargs) -> None:
    options = environment.parsed_options
    if options is not None and not options.model:
        sys.stderr.write("tensorwire locustfile: pass --model NAME (or set LOCUST_MODEL)\n")
        sys.exit(2)
    _environment[:] = [environment]


def _entry_summary(entry) -> dict:
    percentile = entry.get_response_time_percentile
    count = entry.num_requests
    return {
        "requests": count,
        "failures": entry.num_failures,
        "requests_per_s": entry.total_rps,
        "failures_per_s": entry.total_fail_per_sec,
        "avg_ms": entry.avg_response_time,
        "p50_ms": percentile(0.5) if count else None,
        "p90_ms": percentile(0.9) if count else None,
        "p99_ms": percentile(0.99) if count else None,
        "max_ms": entry.max_response_time if count else None,
        "avg_response_bytes": entry.avg_content_length,
    }


@events.quit.add_listener
def _write_summary(exit_code: int, **_kwargs) -> None:
    from locust.runners import WorkerRunner

    if not _environment:
        return
    environment = _environment[0]
    options = environment.parsed_options
    if options is None or not options.summary_json or isinstance(environment.runner, WorkerRunner):
        return
    stats = environment.runner.stats
    summary = {
        "exit_code": exit_code,
        "model": options.model,
        "host": environment.host,
        "users": options.num_users,
        "processes": options.processes or 1,
        "batch_size": options.batch_size,
        "stream": options.stream,
        "total": _entry_summary(stats.total),
        "entries": {f"{e.method} {e.name}": _entry_summary(e) for e in stats.entries.values()},
        "errors": {f"{e.method} {e.name}: {e.error}": e.occurrences for e in stats.errors.values()},
    }
    Path(options.summary_json).write_text(json.dumps(summary, indent=2) + "\n")


@events.quitting.add_listener
def _close_clients(**_kwargs) -> None:
    client = _shared.pop(os.getpid(), None)
    if client is not None:
        client.close()


class TensorwireUser(User):
    """One simulated application calling ``infer`` on one model."""

    wait_time = constant(0)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.model = options.model
        self.version = options.model_version or None
        self.timeout = options.request_timeout
        if options.think_time > 0:
            self.wait_time = between(options.think_time * 0.5, options.think_time * 1.5)
        target, tls = parse_target(self.host)
        self._own = options.connection_per_user
        self.client = _client(target, tls, self._own)
        started = time.perf_counter()
        try:
            self.inputs, _, _ = request_inputs(
                self.client,
                self.model,
                options.batch_size,
                parse_shape(options.input_shape),
                options.datatype or None,
                seed=0,
                version=self.version,
            )
        except Exception as exc:  # unreachable server, unknown model, bad shape: a visible failure
            self.environment.events.request.fire(
                request_type="grpc-setup",
                name=self.model,
                response_time=(time.perf_counter() - started) * 1000.0,
                response_length=0,
                exception=exc,
                context={},
            )
            raise

    def on_stop(self) -> None:
        self._close_stream()
        if getattr(self, "_own", False):
            self.client.close()

    def _close_stream(self) -> None:
        stream, self._stream = getattr(self, "_stream", None), None
        if stream is not None:
            stream.cancel()

    def _open_stream(self):
        self._stream = self.client.stream(self.model, version=self.version, max_in_flight=1)
        return self._stream

    def _infer_on_stream(self) -> dict:
        """One request on this user's stream, opened on first use. A stream that refuses to send (it broke)
        is replaced once at once; a request's own error leaves the stream open; a timeout replaces it."""
        stream = getattr(self, "_stream", None) or self._open_stream()
        try:
            future = stream.submit(self.inputs)
        except InferenceServerError:
            self._close_stream()
            future = self._open_stream().submit(self.inputs)
        try:
            return future.result(timeout=self.timeout)
        except FutureTimeout:
            self._close_stream()
            raise

    @task
    def infer(self) -> None:
        stream = self.environment.parsed_options.stream
        started = time.perf_counter()
        length, error = 0, None
        try:
            if stream:
                result = self._infer_on_stream()
            else:
                result = self.client.infer(self.model, self.inputs, version=self.version, timeout=self.timeout)
            length = sum(array.nbytes for array in result.values())
        except Exception as exc:  # every SDK error is an InferenceServerError; count anything else too
            error = exc
        self.environment.events.request.fire(
            request_type="grpc-stream" if stream else "grpc",
            name=self.model,
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=error,
            context={},
        )
