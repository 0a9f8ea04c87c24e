"""What the client SDK costs on top of the raw gRPC stub, and what streaming buys.

    python -m tensorwire.loadtest.sdk_overhead --address 127.0.0.1:8001 --model identity

Two measurements against one running server, printed as one markdown table:

1. **SDK overhead**, single sample, sequential: the per-call time of
   ``InferenceClient.infer`` against the raw stub (``channel.unary_unary`` on the
   standard path, the request built from the same numpy array with ``tobytes``
   and the answer read with ``np.frombuffer``: the least any caller must do).
   Rounds alternate raw and SDK so that drift on a busy machine hits both; the
   median of the per-round means is reported. Target: SDK / raw <= 1.10.
2. **Streaming vs unary throughput** at the same concurrency: ``--concurrency``
   threads each calling ``infer`` in a loop, against one ``ModelStreamInfer``
   stream with that many requests in flight; then the same pair with the asyncio
   client. Target: stream / unary >= 1.5 for small requests.

The input is built from the model's metadata (variable dimensions as 1), as every load generator here
builds it. CPU: this process, and with ``--server-pid`` the server's process tree (psutil).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from tensorwire.client import AsyncInferenceClient, InferenceClient
from tensorwire.loadtest import _stats
from tensorwire.loadtest._cli import DefaultsOnceFormatter
from tensorwire.loadtest._inputs import request_inputs
from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS


def raw_caller(channel: grpc.Channel, model: str, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    """The baseline: the raw stub, a request built per call, outputs as np.frombuffer views."""
    method = METHODS["ModelInfer"]
    stub = channel.unary_unary(
        method.path,
        request_serializer=method.request.SerializeToString,
        response_deserializer=method.response.FromString,
    )
    items = [(name, codec.datatype_of(array), array) for name, array in inputs.items()]

    def call() -> object:
        request = pb.ModelInferRequest(model_name=model)
        for name, datatype, array in items:
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(
                codec.serialize_bytes_tensor(array) if datatype == "BYTES" else array.tobytes()
            )
        response = stub(request)
        out = {}
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
            if tensor.datatype == "BYTES":
                out[tensor.name] = codec.deserialize_bytes_tensor(raw, int(np.prod(tensor.shape)))
            else:
                dtype = codec.NUMPY_DTYPES[tensor.datatype]
                out[tensor.name] = np.frombuffer(raw, dtype).reshape(tensor.shape)
        return out

    return call


def per_call_s(call: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - started) / calls


def overhead(address: str, model: str, inputs: dict[str, np.ndarray], calls: int, rounds: int) -> dict[str, float]:
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel, InferenceClient(address) as client:
        raw = raw_caller(channel, model, inputs)

        def sdk() -> object:
            return client.infer(model, inputs)

        for _ in range(max(50, calls // 10)):  # connections, caches, server warm-up
            raw()
            sdk()
        raw_rounds, sdk_rounds = [], []
        for index in range(rounds):
            # Alternate which goes first, so neither always follows the other.
            if index % 2:
                sdk_rounds.append(per_call_s(sdk, calls))
                raw_rounds.append(per_call_s(raw, calls))
            else:
                raw_rounds.append(per_call_s(raw, calls))
                sdk_rounds.append(per_call_s(sdk, calls))
    # Each round's SDK time over the raw time measured right next to it: drift cancels.
    ratios = [s / r for s, r in zip(sdk_rounds, raw_rounds, strict=True)]
    return {
        "raw_us": statistics.median(raw_rounds) * 1e6,
        "sdk_us": statistics.median(sdk_rounds) * 1e6,
        "ratio": statistics.median(ratios),
    }


def client_cpu(model: str, inputs: dict[str, np.ndarray], repeat: int = 20000) -> dict[str, float]:
    """Python time per call without the network: request out and response in, SDK vs raw (µs per call).

    Empty when the model has BYTES inputs, or when the SDK's request builder is not where it was
    (it is the SDK's private module; the row is then left out rather than the whole measurement).
    """
    try:
        from tensorwire.client._convert import build_request, parse_response
    except ImportError:
        return {}

    response = pb.ModelInferResponse(model_name=model)
    for name, array in inputs.items():
        datatype = codec.datatype_of(array)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(codec.encode_raw(array, datatype)[2])
    items = [(name, codec.datatype_of(array), array) for name, array in inputs.items()]

    def raw() -> object:
        request = pb.ModelInferRequest(model_name=model)
        for name, datatype, array in items:
            request.inputs.add(name=name, datatype=datatype, shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        return {
            t.name: np.frombuffer(r, codec.NUMPY_DTYPES[t.datatype]).reshape(t.shape)
            for t, r in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    def sdk() -> object:
        build_request(model, inputs)
        return parse_response(response)

    if any(datatype == "BYTES" for _, datatype, _ in items):
        return {}
    best = {}
    for name, fn in (("raw", raw), ("sdk", sdk)):
        runs = []
        for _ in range(10):
            started = time.perf_counter()
            for _ in range(repeat // 10):
                fn()
            runs.append((time.perf_counter() - started) / (repeat // 10))
        best[name] = min(runs) * 1e6
    return best


class Meter:
    """One timed run: requests per second, and client/server CPU microseconds per request."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.rates: list[float] = []
        self.client_us: list[float] = []
        self.server_us: list[float] = []

    def _server_cpu_s(self) -> float:
        return (_stats.process_tree_cpu_s(self.server_pid) or 0.0) if self.server_pid else 0.0

    def start(self) -> None:
        self._wall, self._cpu = time.perf_counter(), _stats.own_cpu_s()
        self._server = self._server_cpu_s()

    def stop(self, requests: int) -> None:
        self.rates.append(requests / (time.perf_counter() - self._wall))
        self.client_us.append((_stats.own_cpu_s() - self._cpu) / requests * 1e6)
        self.server_us.append((self._server_cpu_s() - self._server) / requests * 1e6)


def _paired(unary: Meter, stream: Meter) -> dict[str, float]:
    """Medians, and the median of per-round stream/unary ratios (drift cancels)."""
    return {
        "unary": statistics.median(unary.rates),
        "stream": statistics.median(stream.rates),
        "ratio": statistics.median(s / u for s, u in zip(stream.rates, unary.rates, strict=True)),
        "unary_client_us": statistics.median(unary.client_us),
        "stream_client_us": statistics.median(stream.client_us),
        "unary_server_us": statistics.median(unary.server_us),
        "stream_server_us": statistics.median(stream.server_us),
    }


def sync_throughput(
    address: str,
    model: str,
    inputs: dict[str, np.ndarray],
    requests: int,
    concurrency: int,
    rounds: int,
    server_pid: int | None,
) -> dict[str, float]:
    """``concurrency`` threads calling ``infer`` vs one stream with that many in flight, in rounds."""
    per_thread = max(1, requests // concurrency)
    total = per_thread * concurrency
    unary_meter, stream_meter = Meter(server_pid), Meter(server_pid)
    with InferenceClient(address) as client, client.stream(model, max_in_flight=concurrency) as stream:

        def worker() -> None:
            for _ in range(per_thread):
                client.infer(model, inputs)

        def unary() -> None:
            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            unary_meter.start()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            unary_meter.stop(total)

        def streamed(count: int = total, meter: Meter | None = stream_meter) -> None:
            if meter:
                meter.start()
            for future in stream.map(inputs for _ in range(count)):
                future.result()
            if meter:
                meter.stop(count)

        for _ in range(100):
            client.infer(model, inputs)
        streamed(200, None)
        for index in range(rounds):
            for run in (streamed, unary) if index % 2 else (unary, streamed):
                run()
    return _paired(unary_meter, stream_meter)


async def _async_throughput(
    address: str,
    model: str,
    inputs: dict[str, np.ndarray],
    requests: int,
    concurrency: int,
    rounds: int,
    server_pid: int | None,
) -> dict[str, float]:
    per_task = max(1, requests // concurrency)
    total = per_task * concurrency
    unary_meter, stream_meter = Meter(server_pid), Meter(server_pid)
    client = AsyncInferenceClient(address)
    async with client, client.stream(model, max_in_flight=concurrency) as stream:

        async def worker() -> None:
            for _ in range(per_task):
                await client.infer(model, inputs)

        async def unary() -> None:
            unary_meter.start()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            unary_meter.stop(total)

        async def streamed(count: int = total, meter: Meter | None = stream_meter) -> None:
            if meter:
                meter.start()
            async for future in stream.map(inputs for _ in range(count)):
                future.result()
            if meter:
                meter.stop(count)

        for _ in range(100):
            await client.infer(model, inputs)
        await streamed(200, None)
        for index in range(rounds):
            for run in (streamed, unary) if index % 2 else (unary, streamed):
                await run()
    return _paired(unary_meter, stream_meter)


def measure(
    address: str,
    model: str = "identity",
    *,
    calls: int = 200,
    rounds: int = 31,
    concurrency: int = 16,
    requests: int = 2000,
    throughput_rounds: int = 7,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Both measurements against a running server (see the module docstring); the numbers as a dict.

    Raises the SDK's InferenceServerError when the server or the model is not there.
    """
    with InferenceClient(address, timeout=30) as client:
        client.wait_until_ready(model, timeout=60)
        inputs, _, _ = request_inputs(client, model)
    shapes = ", ".join(f"{name} {codec.datatype_of(a)}{list(a.shape)}" for name, a in inputs.items())
    return {
        "address": address,
        "model": model,
        "inputs": shapes,
        "calls": calls,
        "rounds": rounds,
        "concurrency": concurrency,
        "requests": requests,
        "throughput_rounds": throughput_rounds,
        "server_cpu": server_pid is not None,
        "client_cpu": client_cpu(model, inputs),
        "overhead": overhead(address, model, inputs, calls, rounds),
        "sync": sync_throughput(address, model, inputs, requests, concurrency, throughput_rounds, server_pid),
        "asyncio": asyncio.run(
            _async_throughput(address, model, inputs, requests, concurrency, throughput_rounds, server_pid)
        ),
    }


def render(result: dict[str, Any]) -> str:
    """The numbers of :func:`measure` as a sentence and a markdown table, with the targets checked."""
    c, cpu, cost, sync, aio = (result[k] for k in ("concurrency", "client_cpu", "overhead", "sync", "asyncio"))

    def cpu_text(numbers: dict[str, float], kind: str) -> str:
        text = f"client {numbers[kind + '_client_us']:.0f} µs/req"
        if result["server_cpu"]:
            text += f", server {numbers[kind + '_server_us']:.0f} µs/req"
        return text

    verdict = {True: "yes", False: "**no**"}
    rows = []
    if cpu:
        rows.append(
            ("client Python time per call, no network: raw → SDK", f"{cpu['raw']:.1f} → {cpu['sdk']:.1f} µs", "")
        )
    rows += [
        ("raw stub, sequential, per call", f"{cost['raw_us']:.1f} µs", ""),
        ("SDK `infer`, sequential, per call", f"{cost['sdk_us']:.1f} µs", ""),
        ("SDK / raw (median of paired rounds)", f"{cost['ratio']:.3f}", f"≤ 1.10: {verdict[cost['ratio'] <= 1.10]}"),
        (f"sync unary, {c} threads", f"{sync['unary']:.0f} req/s", cpu_text(sync, "unary")),
        (f"sync stream, {c} in flight", f"{sync['stream']:.0f} req/s", cpu_text(sync, "stream")),
        (
            "sync stream / unary (median of paired rounds)",
            f"{sync['ratio']:.2f}×",
            f"≥ 1.5: {verdict[sync['ratio'] >= 1.5]}",
        ),
        (f"asyncio unary, {c} tasks", f"{aio['unary']:.0f} req/s", cpu_text(aio, "unary")),
        (f"asyncio stream, {c} in flight", f"{aio['stream']:.0f} req/s", cpu_text(aio, "stream")),
        (
            "asyncio stream / unary (median of paired rounds)",
            f"{aio['ratio']:.2f}×",
            f"≥ 1.5: {verdict[aio['ratio'] >= 1.5]}",
        ),
    ]
    lines = [
        f"SDK overhead and streaming: model `{result['model']}` ({result['inputs']}); overhead: "
        f"{result['rounds']} rounds × {result['calls']} calls; throughput: {result['throughput_rounds']} rounds × "
        f"{result['requests']} requests, concurrency {c}",
        "",
        "| measurement | value | target / CPU per request |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {target} |" for name, value, target in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.sdk_overhead",
        description=__doc__.split("\n")[0],
        formatter_class=DefaultsOnceFormatter,
    )
    parser.add_argument("--address", default="127.0.0.1:8001", help="server host:port")
    parser.add_argument("--model", default="identity", help="model to call (small inputs are the point)")
    parser.add_argument("--calls", type=int, default=200, help="sequential calls per round (overhead)")
    parser.add_argument("--rounds", type=int, default=31, help="alternating raw/SDK rounds (overhead)")
    parser.add_argument("--concurrency", type=int, default=16, help="threads/tasks, in-flight requests")
    parser.add_argument("--requests", type=int, default=2000, help="requests per throughput round")
    parser.add_argument("--throughput-rounds", type=int, default=7, help="alternating unary/stream rounds")
    parser.add_argument("--server-pid", type=int, help="the server's process id, to report its CPU time per request")
    args = parser.parse_args(argv)
    result = measure(
        args.address,
        args.model,
        calls=args.calls,
        rounds=args.rounds,
        concurrency=args.concurrency,
        requests=args.requests,
        throughput_rounds=args.throughput_rounds,
        server_pid=args.server_pid,
    )
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
