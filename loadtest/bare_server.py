"""The baseline: the simplest correct Open Inference Protocol (KServe v2) gRPC server in Python.

    python -m tensorwire.loadtest.bare_server --repo bench_models --port 8011 [--models identity,cnn] [--threads 2]

What tensorwire's serving overhead is measured against. One ``grpc.aio`` server, one event loop, one
ONNX Runtime session per model, and every ``ModelInfer`` request (or ``ModelStreamInfer`` message) is
answered by one ``session.run`` call made right in the handler: no batching, no queue, no threads of
our own, no statistics, no metrics, no deadlines beyond gRPC's own. It answers what Triton's
perf_analyzer and the tensorwire SDK need: ``ServerLive``, ``ServerReady``, ``ModelReady``,
``ServerMetadata`` (listing no extensions, so perf_analyzer does not ask for statistics),
``ModelMetadata``, ``ModelConfig``, ``ModelInfer`` and ``ModelStreamInfer``; any other method is
UNIMPLEMENTED.

Models: every ``<repo>/<name>/<version>/model.onnx`` (the highest version), or those named in
``--models``. The batch dimension is taken from ``config.toml``'s ``max_batch_size`` when the folder has
one (0 otherwise); tensor names, datatypes and shapes come from the ONNX file. Each session gets
``--threads`` intra-op threads (default: the usable cores, since only one request computes at a time)
with spinning off (spinning threads would starve the event loop on a small machine).

Errors: an unknown model is NOT_FOUND; a request whose inputs do not match the model's (names,
datatypes, shapes, byte sizes) is INVALID_ARGUMENT with a message naming the input; ONNX Runtime
failing is INTERNAL. On a stream the same errors come back in-band (``error_message``) and the stream
stays open.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from tensorwire.loadtest.ceiling import make_session
from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.service import METHODS, SERVICE_NAME
from tensorwire.repository.onnx_types import ONNX_DATATYPES

log = logging.getLogger("tensorwire.bare_server")

#: v2 datatypes -> Triton's ModelConfig DataType enum names (perf_analyzer reads ModelConfig)
CONFIG_TYPES = {
    datatype: f"TYPE_{'STRING' if datatype == 'BYTES' else datatype}" for datatype in ONNX_DATATYPES.values()
}


class RequestError(Exception):
    """A request this server refuses: ``code`` is the gRPC status, the message says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Tensor:
    """One input or output: ``dims`` without the batch dimension (-1 = variable)."""

    name: str
    datatype: str
    dims: list[int]


@dataclass
class Model:
    """One served model: its session, signature and ``max_batch_size`` (0 = no batch dimension)."""

    name: str
    version: str
    session: object
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]

    def shape(self, tensor: Tensor) -> list[int]:
        """The shape metadata reports: with a leading -1 when the model takes a batch dimension."""
        return ([-1] if self.max_batch_size > 0 else []) + tensor.dims


def _tensors(values, batched: bool) -> list[Tensor]:
    tensors = []
    for value in values:
        if ONNX_DATATYPES.get(value.type, "BF16") == "BF16":  # BF16 would need the server's bf16 conversion
            raise ValueError(f"{value.name}: ONNX type {value.type} is not served by the bare server")
        dims = [d if isinstance(d, int) and d > 0 else -1 for d in value.shape]
        tensors.append(Tensor(value.name, ONNX_DATATYPES[value.type], dims[1:] if batched else dims))
    return tensors


def load_model(model_dir: Path, threads: int) -> Model:
    """The highest version's ``model.onnx`` under ``model_dir`` in one CPU session with ``threads`` threads.

    Raises FileNotFoundError when there is no ``<version>/model.onnx``.
    """
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file())
    if not versions:
        raise FileNotFoundError(f"{model_dir} has no <version>/model.onnx")
    max_batch_size = 0
    if (model_dir / "config.toml").is_file():
        from tensorwire.repository import load_model_config

        max_batch_size = load_model_config(model_dir).max_batch_size
    session = make_session(model_dir / str(versions[-1]) / "model.onnx", threads, spinning=False)
    batched = max_batch_size > 0
    return Model(
        model_dir.name,
        str(versions[-1]),
        session,
        max_batch_size,
        _tensors(session.get_inputs(), batched),
        _tensors(session.get_outputs(), batched),
    )


class BareServicer:
    """The v2 methods, each a plain coroutine over a dict of loaded models."""

    def __init__(self, models: dict[str, Model]) -> None:
        self.models = models

    def _model(self, name: str, version: str) -> Model:
        model = self.models.get(name)
        if model is None or version not in ("", model.version):
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r} version {version or '(any)'}")
        return model

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        model = self.models.get(request.name)
        return pb.ModelReadyResponse(ready=model is not None and request.version in ("", model.version))

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare-grpc-aio", version="1", extensions=[])

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        model = await _or_abort(context, self._model, request.name, request.version)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform="onnxruntime_onnx",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=model.shape(t))
                for t in model.inputs
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=model.shape(t))
                for t in model.outputs
            ],
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        model = await _or_abort(context, self._model, request.name, request.version)
        return pb.ModelConfigResponse(
            config=pb.ModelConfig(
                name=model.name,
                platform="onnxruntime_onnx",
                backend="onnxruntime",
                max_batch_size=model.max_batch_size,
                input=[
                    pb.ModelInput(name=t.name, data_type=pb.DataType.Value(CONFIG_TYPES[t.datatype]), dims=t.dims)
                    for t in model.inputs
                ],
                output=[
                    pb.ModelOutput(name=t.name, data_type=pb.DataType.Value(CONFIG_TYPES[t.datatype]), dims=t.dims)
                    for t in model.outputs
                ],
            )
        )

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """Answer one request with one ``session.run`` call; raises RequestError for what it refuses."""
        model = self._model(request.model_name, request.model_version)
        feeds = _decode_inputs(model, request)
        wanted = [t.name for t in request.outputs] or [t.name for t in model.outputs]
        known = {t.name: t for t in model.outputs}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"model {model.name!r} has no output {unknown[0]!r}")
        try:
            results = model.session.run(wanted, feeds)
        except Exception as err:  # ONNX Runtime's own exception types
            raise RequestError(grpc.StatusCode.INTERNAL, f"model {model.name!r} failed: {err}") from err
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        for name, array in zip(wanted, results, strict=True):
            datatype, shape, raw = codec.encode_raw(array, known[name].datatype)
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        return response

    async def ModelInfer(self, request, context) -> pb.ModelInferResponse:
        return await _or_abort(context, self.infer, request)

    async def ModelStreamInfer(self, requests: AsyncIterator, context) -> AsyncIterator:
        async for request in requests:
            try:
                yield pb.ModelStreamInferResponse(infer_response=self.infer(request))
            except RequestError as err:
                yield pb.ModelStreamInferResponse(
                    error_message=str(err), infer_response=pb.ModelInferResponse(id=request.id)
                )


async def _or_abort(context, function, *args):
    try:
        return function(*args)
    except RequestError as err:
        await context.abort(err.code, str(err))


def _decode_inputs(model: Model, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    expected = {t.name: t for t in model.inputs}
    given = [t.name for t in request.inputs]
    if sorted(given) != sorted(expected):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"model {model.name!r} takes inputs {sorted(expected)}, got {given}"
        )
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs"
        )
    feeds = {}
    for index, tensor in enumerate(request.inputs):
        spec = expected[tensor.name]
        shape = list(tensor.shape)
        want = model.shape(spec)
        fits = (
            tensor.datatype == spec.datatype
            and len(shape) == len(want)
            and min(shape, default=0) >= 0
            and all(w in (-1, s) for w, s in zip(want, shape, strict=True))
            and (model.max_batch_size == 0 or 1 <= shape[0] <= model.max_batch_size)
        )
        if not fits:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {tensor.name!r}: expected {spec.datatype} {want} (batch <= "
                f"{model.max_batch_size}), got {tensor.datatype} {shape}",
            )
        try:
            if raw:
                array = codec.decode_raw(raw[index], tensor.datatype, shape)
            else:
                array = codec.decode_contents(tensor.contents, tensor.datatype, shape)
        except (codec.CodecError, ValueError, OverflowError) as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {tensor.name!r}: {err}") from err
        if tensor.datatype == "BYTES":  # ONNX Runtime's strings are str
            array = np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])(array)
        feeds[tensor.name] = array
    return feeds


def handlers(servicer: BareServicer) -> grpc.GenericRpcHandler:
    """The service under its standard name, ``inference.GRPCInferenceService``."""
    table = {}
    for name in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelConfig",
        "ModelInfer",
    ):
        m = METHODS[name]
        table[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=m.request.FromString,
            response_serializer=m.response.SerializeToString,
        )
    m = METHODS["ModelStreamInfer"]
    table["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=m.request.FromString,
        response_serializer=m.response.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)


async def serve(models: dict[str, Model], host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT, then stop at once (nothing is drained: it is a baseline)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    server.add_generic_rpc_handlers((handlers(BareServicer(models)),))
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port}: the port is in use (choose another with --port)")
    await server.start()
    log.warning("bare server: %s on %s:%d", ", ".join(models), host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.bare_server", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository: <repo>/<name>/<version>/model.onnx")
    parser.add_argument("--models", default="", help="comma-separated model names (default: every ONNX model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8011, help="gRPC port")
    parser.add_argument(
        "--threads",
        type=int,
        default=_usable_cores(),
        help="intra-op threads per session (default: the usable cores, %(default)s here)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = [n.strip() for n in args.models.split(",") if n.strip()] or sorted(
        p.name for p in args.repo.iterdir() if p.is_dir() and any(p.glob("*/model.onnx"))
    )
    try:
        models = {name: load_model(args.repo / name, args.threads) for name in names}
    except (OSError, ValueError) as err:
        print(f"bare_server: error: {err}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(models, args.host, args.port))
    except OSError as err:
        print(f"bare_server: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
