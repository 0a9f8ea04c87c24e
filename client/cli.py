"""``tensorwire health | metadata | infer | index | load | unload``: the SDK on the command line.

Examples::

    tensorwire health -a 127.0.0.1:8001 --model digits_cnn      # exit 0 = live and ready
    tensorwire metadata --model digits_cnn --config              # JSON on stdout
    tensorwire infer --model digits_cnn INPUT0=x.npy -o out.npz  # or inputs.npz / inputs.json
    tensorwire index                                             # models, states, reasons
    tensorwire load digits_cnn                                   # (re)load from the repository

Exit codes: 0 success (and, for ``health``, everything live/ready), 1 not ready or a
request error, 2 usage error or server unreachable.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
from collections.abc import Sequence, Set
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor

from tensorwire.client._casting import conform
from tensorwire.client._channel import DEFAULT_MAX_MESSAGE_BYTES, TLSConfig, channel_spec
from tensorwire.client._health import health_check
from tensorwire.client.errors import (
    InferenceServerError,
    InvalidInputError,
    UnauthenticatedError,
    UnavailableError,
    from_rpc_error,
)
from tensorwire.client.results import InferResult, Tensor
from tensorwire.client.retry import RetryPolicy
from tensorwire.client.sync import InferenceClient
from tensorwire.proto import codec

ADDRESS_ENV = "TENSORWIRE_ADDRESS"
TOKEN_ENV = "TENSORWIRE_AUTH_TOKEN"


# ------------------------------------------------------------------ common options


def _connection_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    group = parser.add_argument_group("connection")
    group.add_argument(
        "-a",
        "--address",
        default=os.environ.get(ADDRESS_ENV, "127.0.0.1:8001"),
        help=f"server host:port, or several comma-separated (round-robin) (env {ADDRESS_ENV})",
    )
    group.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds (default 30)")
    group.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-file/--cert-file)")
    group.add_argument("--ca-file", help="PEM CA bundle that signed the server certificate")
    group.add_argument("--cert-file", help="client certificate (PEM) for mutual TLS")
    group.add_argument("--key-file", help="client private key (PEM) for mutual TLS")
    group.add_argument("--server-name", help="host name to verify in the server certificate")
    group.add_argument("--token", help=f"bearer token (default: env {TOKEN_ENV})")
    group.add_argument("--token-file", help="read the bearer token from this file")
    group.add_argument("--gzip", action="store_true", help="gzip-compress requests")
    group.add_argument("--retries", type=int, default=3, help="attempts per call when it is safe to retry")
    return parser


def _token(args: argparse.Namespace) -> str | None:
    token = args.token
    if args.token_file:
        token = Path(args.token_file).expanduser().read_text().strip()
    return token or os.environ.get(TOKEN_ENV) or None


def _tls(args: argparse.Namespace) -> TLSConfig | None:
    if args.tls or args.ca_file or args.cert_file or args.key_file or args.server_name:
        return TLSConfig(args.ca_file, args.cert_file, args.key_file, args.server_name)
    return None


def _client(args: argparse.Namespace) -> InferenceClient:
    return InferenceClient(
        args.address,
        tls=_tls(args),
        token=_token(args),
        compression="gzip" if args.gzip else None,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=max(1, args.retries)),
    )


def _fail(error: Exception) -> int:
    """Report an error; 2 for unreachable servers and usage/file problems, 1 for request errors."""
    print(f"tensorwire: {error}", file=sys.stderr)
    if isinstance(error, UnavailableError):
        return 2
    return 1 if isinstance(error, InferenceServerError) else 2


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


#: protobuf's JSON mapping writes these as strings (JavaScript's numbers hold 53 bits); the CLI prints numbers
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)


def _message_dict(message: Any) -> dict[str, Any]:
    """``message`` as a JSON-ready dict (proto field names), with 64-bit integers (shapes, dims, counts,
    nanoseconds) as JSON numbers rather than the strings of protobuf's JSON mapping."""
    return _int64_as_numbers(message, json_format.MessageToDict(message, preserving_proto_field_name=True))


def _int64_as_numbers(message: Any, value: dict[str, Any]) -> dict[str, Any]:
    """Turn the 64-bit integer fields of ``value`` (``message`` as MessageToDict wrote it) into ints, in place,
    through nested, repeated and string-keyed map fields."""
    for field in message.DESCRIPTOR.fields:
        if field.name not in value:
            continue
        given, written = getattr(message, field.name), value[field.name]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].message_type is not None:
                for key, item in written.items():
                    if key in given:
                        _int64_as_numbers(given[key], item)
        elif entry is not None:
            items = zip(given, written, strict=True) if isinstance(written, list) else [(given, written)]
            for inner, item in items:
                _int64_as_numbers(inner, item)
        elif field.type in _INT64_TYPES:
            value[field.name] = [int(x) for x in written] if isinstance(written, list) else int(written)
    return value


# -------------------------------------------------------------------------- health

_YES = {True: "yes", False: "no"}


def _index_reasons(client: InferenceClient, names: Sequence[str] | None) -> dict[str, str]:
    """Why each of ``names`` (None: every model) is not ready, from RepositoryIndex (which carries the load
    error); models unloaded on request are left out when ``names`` is None (they do not hold readiness)."""
    try:
        index = client.repository_index()
    except InferenceServerError:
        return {}
    reasons: dict[str, list[str]] = {}
    for entry in index:
        if names is None and entry.reason == "unloaded":
            continue
        if (names is None or entry.name in names) and entry.state != "READY":
            where = f"version {entry.version} " if entry.version else ""
            text = f"{where}{entry.state}" + (f": {entry.reason}" if entry.reason else "")
            reasons.setdefault(entry.name, []).append(text)
    return {name: "; ".join(parts) for name, parts in reasons.items()}


def _health_v2(client: InferenceClient, args: argparse.Namespace, report: dict[str, Any]) -> None:
    """Liveness and readiness through the v2 API (needs the token when the server requires one)."""
    report["live"] = client.server_live()
    report["ready"] = client.server_ready()
    if report["live"] and not report["ready"]:
        report["not_ready"] = _index_reasons(client, None)
    models: dict[str, bool] = {}
    errors: dict[str, str] = {}
    for model in args.model:
        try:
            models[model] = client.model_ready(model, args.version)
        except (UnavailableError, UnauthenticatedError):
            raise
        except InferenceServerError as error:
            models[model] = False
            errors[model] = str(error)
    not_ready = [model for model, ready in models.items() if not ready and model not in errors]
    if not_ready:
        errors.update(_index_reasons(client, not_ready))
    if models:
        report["models"] = models
    if errors:
        report["errors"] = errors


def _health_open(args: argparse.Namespace, report: dict[str, Any]) -> None:
    """The same answers from the open ``grpc.health.v1`` service: no versions, no reasons."""
    spec = channel_spec(
        args.address,
        tls=_tls(args),
        token=_token(args),
        compression=None,
        keepalive=None,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing=None,
        retry=RetryPolicy(),
        options=(),
        user_agent="tensorwire-cli",
    )
    channel = spec.open_sync()
    try:
        status = health_check(channel, "", timeout=args.timeout, metadata=spec.metadata)
        report["live"], report["ready"] = True, status == "SERVING"
        models: dict[str, bool] = {}
        errors: dict[str, str] = {}
        for model in args.model:
            try:
                status = health_check(channel, model, timeout=args.timeout, metadata=spec.metadata)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                status = "not known to the server"
            models[model] = status == "SERVING"
            if not models[model]:
                errors[model] = status
        if models:
            report["models"] = models
        if errors:
            report["errors"] = errors
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        channel.close()


def health(argv: Sequence[str]) -> int:
    """``tensorwire health``: exit 0 when the server (and each ``--model``) is live and ready.

    Exit codes: 0 live and ready; 1 answered but something is not ready (or a request was refused);
    2 unreachable or a usage error. When the server requires a token that was not given (or was
    refused), the open ``grpc.health.v1`` service answers instead, as Kubernetes probes use it.
    """
    parser = _connection_parser("tensorwire health", "Check server liveness/readiness and model readiness.")
    parser.add_argument("-m", "--model", action="append", default=[], help="also check this model (repeat)")
    parser.add_argument("--version", help="model version to check (default: the server's choice)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(list(argv))
    report: dict[str, Any] = {"address": args.address, "checked_with": "v2"}
    note = ""
    try:
        with _client(args) as client:
            try:
                _health_v2(client, args, report)
            except UnauthenticatedError:
                report.pop("live", None)
                report.pop("ready", None)
                report["checked_with"] = "grpc.health.v1"
                given = "was refused" if _token(args) else "was not given"
                note = (
                    f"the server requires a token for its v2 API and one {given}; checked with the open "
                    f"grpc.health.v1 service instead (--token or {TOKEN_ENV} adds versions and reasons)"
                )
                if args.version:
                    note += f"; --version {args.version} was not checked"
                _health_open(args, report)
    except (InferenceServerError, OSError, ValueError) as error:
        unreachable = not isinstance(error, InferenceServerError) or isinstance(error, UnavailableError)
        report.setdefault("live", False)
        report.setdefault("ready", False)
        report["error"] = str(error)
        if args.json:
            _print_json(report)
        else:
            print(f"tensorwire health: {args.address}: {error}", file=sys.stderr)
        return 2 if unreachable else 1
    healthy = report["live"] and report["ready"] and all(report.get("models", {}).values())
    if note:
        report["note"] = note
        print(f"tensorwire health: note: {note}", file=sys.stderr)
    if args.json:
        _print_json(report)
    else:
        print(f"server {args.address}: live={_YES[report['live']]} ready={_YES[report['ready']]}")
        for model, why in report.get("not_ready", {}).items():
            print(f"not ready: model {model}: {why}")
        if report.get("not_ready"):
            print(
                "the server is ready once every model is READY (strict readiness, the default): fix or remove "
                "these models, or start the server with --no-strict-readiness to serve the others"
            )
        for model, ready in report.get("models", {}).items():
            why = report.get("errors", {}).get(model)
            print(f"model {model}: ready={_YES[ready]}" + (f" ({why})" if why else ""))
    return 0 if healthy else 1


# ------------------------------------------------------------ model control


def index(argv: Sequence[str]) -> int:
    """``tensorwire index``: every model in the server's repository, its state and why it is not ready."""
    parser = _connection_parser(
        "tensorwire index", "List the models in the server's repository (RepositoryIndex) with state and reason."
    )
    parser.add_argument("--ready", action="store_true", help="only models that are ready")
    parser.add_argument("--json", action="store_true", help="print the index as JSON")
    args = parser.parse_args(list(argv))
    try:
        with _client(args) as client:
            entries = client.repository_index(ready=args.ready)
    except (InferenceServerError, OSError, ValueError) as error:
        return _fail(error)
    if args.json:
        _print_json([_message_dict(entry) for entry in entries])
        return 0
    rows = [("MODEL", "VERSION", "STATE", "REASON")]
    rows += [(e.name, e.version or "-", e.state, e.reason) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print(
            ("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]).rstrip()
        )
    return 0


def _control(command: str, argv: Sequence[str]) -> int:
    loading = command == "load"
    parser = _connection_parser(
        f"tensorwire {command}",
        "Load (or reload) models from the server's repository (RepositoryModelLoad); returns once each is "
        "ready or has failed."
        if loading
        else "Unload models (RepositoryModelUnload); requests already accepted still finish.",
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="model name (several allowed)")
    parser.set_defaults(timeout=300.0)  # a load includes warm-up: allow more than one request's 30 s
    args = parser.parse_args(list(argv))
    failed = 0
    try:
        with _client(args) as client:
            for model in args.models:
                try:
                    client.load_model(model) if loading else client.unload_model(model)
                except (UnavailableError, UnauthenticatedError):
                    raise
                except InferenceServerError as error:
                    print(f"tensorwire {command}: {model}: {error}", file=sys.stderr)
                    failed += 1
                    continue
                print(f"{'loaded' if loading else 'unloaded'} {model}")
    except (InferenceServerError, OSError, ValueError) as error:
        return _fail(error)
    return 1 if failed else 0


def load(argv: Sequence[str]) -> int:
    """``tensorwire load MODEL...``: exit 0 when every model loaded, 1 when one failed (its reason printed)."""
    return _control("load", argv)


def unload(argv: Sequence[str]) -> int:
    """``tensorwire unload MODEL...``: exit 0 when every model was unloaded, 1 when one was refused."""
    return _control("unload", argv)


# ------------------------------------------------------------------------ metadata


def metadata(argv: Sequence[str]) -> int:
    """``tensorwire metadata``: server metadata, or a model's metadata/config/statistics, as JSON."""
    parser = _connection_parser("tensorwire metadata", "Show server or model metadata as JSON.")
    parser.add_argument("-m", "--model", help="show this model (default: the server)")
    parser.add_argument("--version", help="model version")
    parser.add_argument("--config", action="store_true", help="include the model configuration")
    parser.add_argument("--stats", action="store_true", help="include inference statistics")
    parser.add_argument("--index", action="store_true", help="include the repository index (server view)")
    args = parser.parse_args(list(argv))
    try:
        with _client(args) as client:
            out: dict[str, Any]
            if args.model:
                out = {"metadata": _message_dict(client.model_metadata(args.model, args.version))}
                if args.config:
                    out["config"] = _message_dict(client.model_config(args.model, args.version))
                if args.stats:
                    out["statistics"] = _message_dict(client.model_statistics(args.model, args.version))
            else:
                out = {"server": _message_dict(client.server_metadata())}
                if args.index:
                    out["models"] = [_message_dict(m) for m in client.repository_index()]
                if args.stats:
                    out["statistics"] = _message_dict(client.model_statistics())
    except (InferenceServerError, OSError, ValueError) as error:
        return _fail(error)
    _print_json(out)
    return 0


# --------------------------------------------------------------------------- infer


def _load_json_inputs(path: Path) -> dict[str, Any]:
    """``{"NAME": [...]}`` or the v2 REST form ``{"inputs": [{"name", "datatype", "shape", "data"}]}``."""
    document = json.loads(path.read_text())
    if isinstance(document, dict) and isinstance(document.get("inputs"), list):
        inputs: dict[str, Any] = {}
        for entry in document["inputs"]:
            name, datatype = entry["name"], entry.get("datatype")
            data = entry["data"]
            if datatype == "BYTES":
                array = np.array(data, dtype=object)
            elif datatype == "BF16":
                floats = np.asarray(data, np.float32)
                inputs[name] = Tensor(floats.reshape(entry.get("shape", floats.shape)), "BF16")
                continue
            else:
                array = np.asarray(data, dtype=codec.NUMPY_DTYPES[datatype]) if datatype else np.asarray(data)
            if "shape" in entry:
                array = array.reshape(entry["shape"])
            inputs[name] = array
        return inputs
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object of input name -> nested list")
    return {name: np.asarray(value) for name, value in document.items()}


def _load_inputs(specs: Sequence[str]) -> dict[str, Any]:
    """Inputs from ``NAME=file.npy``, ``file.npz`` and ``file.json`` arguments."""
    inputs: dict[str, Any] = {}
    for spec in specs:
        name, sep, file_name = spec.partition("=")
        if not sep:
            name, file_name = "", spec
        path = Path(file_name).expanduser()
        suffix = path.suffix.lower()
        if suffix == ".npy":
            if not name:
                raise ValueError(f"{spec}: a .npy file needs an input name, as NAME={spec}")
            inputs[name] = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
            if name:
                if len(arrays) != 1:
                    raise ValueError(f"{spec}: NAME=file.npz needs an archive with exactly one array")
                arrays = {name: next(iter(arrays.values()))}
            inputs.update(arrays)
        elif suffix == ".json":
            loaded = _load_json_inputs(path)
            if name:
                if len(loaded) != 1:
                    raise ValueError(f"{spec}: NAME=file.json needs a document with exactly one input")
                loaded = {name: next(iter(loaded.values()))}
            inputs.update(loaded)
        else:
            raise ValueError(f"{spec}: inputs must be .npy, .npz or .json files")
    if not inputs:
        raise ValueError("no inputs given")
    return inputs


def _conform(
    inputs: dict[str, Any], model_inputs: Any, bf16_names: Set[str], cast_names: Set[str] = frozenset()
) -> dict[str, Any]:
    """Add a missing batch dimension and fit datatypes by the SDK's one casting rule.

    Args:
        inputs: input name -> array (or Tensor), as read from the files.
        model_inputs: the model's ``ModelMetadataResponse.inputs`` (shapes with -1 for the batch).
        bf16_names: inputs to send as BF16 (``--bf16``): rounded, as asked.
        cast_names: inputs to send as their declared datatype even if values change (``--cast``).

    Returns:
        name -> value ready for ``InferenceClient.infer``. An array one dimension short of a
        batching model's shape gets a leading batch dimension of 1. Datatypes follow
        ``tensorwire.client._casting.conform`` (JSON numbers and float64/int64 files adapt when
        every value survives; other dtypes must match or widen); inputs the model does not
        declare are left for the server to refuse.

    Raises:
        InvalidInputError: a value the rule refuses; the message names ``--cast NAME``.
    """
    declared = {tensor.name: tensor for tensor in model_inputs}
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        meta = declared.get(name)
        if isinstance(value, Tensor) or meta is None:
            wrap = name in bf16_names and not isinstance(value, Tensor)
            out[name] = Tensor(value, "BF16") if wrap else value
            continue
        array = np.asarray(value)
        shape = list(meta.shape)
        if shape and shape[0] == -1 and array.ndim == len(shape) - 1:
            array = array[np.newaxis, ...]
        if name in bf16_names:
            out[name] = Tensor(array, "BF16")
        elif name in cast_names and meta.datatype in codec.NUMPY_DTYPES:
            out[name] = Tensor(array, meta.datatype)
        else:
            try:
                out[name] = conform(name, array, meta.datatype)
            except InvalidInputError as error:
                raise InvalidInputError(f"{error.details} (on the command line: --cast {name})") from None
    return out


def _as_given(inputs: dict[str, Any], bf16_names: set[str]) -> dict[str, Any]:
    """``--no-conform``: every input with the datatype of its own dtype (BF16 where asked), nothing cast."""
    out: dict[str, Any] = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):
            out[name] = value
            continue
        array = np.asarray(value)
        try:
            datatype = "BF16" if name in bf16_names else codec.datatype_of(array)
        except codec.CodecError as error:
            raise InvalidInputError(f"input {name!r}: {error}") from None
        out[name] = Tensor(array, datatype)
    return out


def _json_array(array: np.ndarray, datatype: str) -> dict[str, Any]:
    if datatype == "BYTES":
        data: list[Any] = []
        for element in array.ravel():
            try:
                data.append(element.decode("utf-8"))
            except UnicodeDecodeError:
                data.append({"b64": base64.b64encode(element).decode("ascii")})
    else:
        data = array.ravel().tolist()
    return {"datatype": datatype, "shape": list(array.shape), "data": data}


def _result_json(result: InferResult) -> dict[str, Any]:
    return {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "id": result.id,
        "outputs": {name: _json_array(array, result.datatypes[name]) for name, array in result.items()},
    }


def infer(argv: Sequence[str]) -> int:
    """``tensorwire infer``: send inputs from files, write outputs to ``.npz``/``.json`` or stdout."""
    parser = _connection_parser(
        "tensorwire infer",
        "Run one inference with inputs from .npy (NAME=file.npy), .npz or .json files.",
    )
    parser.add_argument("inputs", nargs="+", metavar="[NAME=]FILE", help="input files (.npy needs NAME=)")
    parser.add_argument("-m", "--model", required=True, help="model name")
    parser.add_argument("--version", help="model version (default: the server's choice)")
    parser.add_argument("--outputs", help="comma-separated output names to return (default: all)")
    parser.add_argument("-o", "--output", help="write outputs to FILE.npz or .json (default: stdout JSON)")
    parser.add_argument("--bf16", action="append", default=[], metavar="NAME", help="send this input as BF16")
    parser.add_argument(
        "--cast",
        action="append",
        default=[],
        metavar="NAME",
        help="send this input as the model's datatype even if values change (rounding)",
    )
    parser.add_argument("--id", help="request id (echoed back)")
    parser.add_argument("--priority", type=int, help="queue priority level (1 is the highest)")
    parser.add_argument(
        "--no-conform", action="store_true", help="send arrays as they are (no batch dimension added, no casting)"
    )
    args = parser.parse_args(list(argv))
    if args.output and Path(args.output).suffix.lower() not in (".npz", ".json"):
        parser.error("--output must end in .npz or .json")
    try:
        inputs = _load_inputs(args.inputs)
        with _client(args) as client:
            if not args.no_conform:
                meta = client.model_metadata(args.model, args.version)
                inputs = _conform(inputs, meta.inputs, set(args.bf16), set(args.cast))
            else:
                inputs = _as_given(inputs, set(args.bf16))
            outputs = [name for name in args.outputs.split(",") if name] if args.outputs else None
            result = client.infer(
                args.model,
                inputs,
                outputs=outputs,
                version=args.version,
                request_id=args.id,
                priority=args.priority,
            )
    except (InferenceServerError, OSError, ValueError) as error:
        return _fail(error)
    if args.output and args.output.lower().endswith(".npz"):
        # BYTES outputs become fixed-width bytes arrays: .npz files stay loadable without pickle.
        arrays = {name: array.astype(bytes) if array.dtype == object else array for name, array in result.items()}
        np.savez(args.output, **arrays)
        print(f"wrote {', '.join(result)} to {args.output}", file=sys.stderr)
    elif args.output:
        Path(args.output).write_text(json.dumps(_result_json(result), indent=2) + "\n")
        print(f"wrote {', '.join(result)} to {args.output}", file=sys.stderr)
    else:
        _print_json(_result_json(result))
    return 0
