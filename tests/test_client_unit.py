"""The client SDK without a server: error mapping, retry decisions, tensors, channel targets, footprint."""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys

import grpc
import numpy as np
import pytest

from tensorwire.client import (
    DeadlineExceededError,
    InferenceClient,
    InferenceServerError,
    InternalServerError,
    InvalidInputError,
    ModelNotFoundError,
    PermissionDeniedError,
    RequestCancelledError,
    RetryBudget,
    RetryPolicy,
    ServerBusyError,
    Tensor,
    TLSConfig,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedError,
    _channel,
    _convert,
    bf16,
    cli,
    errors,
)
from tensorwire.client.retry import Retrier, connection_lost, never_sent
from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb

Code = grpc.StatusCode

# Messages exactly as grpcio 1.85 reports them (captured from real failures).
REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:35505: "
    "Failed to connect to remote host: Connection refused"
)
RR_REFUSED = (
    "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:48598: "
    "Failed to connect to remote host: Connection refused"
)
DNS_FAILED = "errors resolving nosuch.invalid:1: [field:hostname lookup error:Domain name not found]"
SOCKET_CLOSED = "Stream removed (Socket closed)"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (Code.NOT_FOUND, ModelNotFoundError),
        (Code.INVALID_ARGUMENT, InvalidInputError),
        (Code.RESOURCE_EXHAUSTED, ServerBusyError),
        (Code.DEADLINE_EXCEEDED, DeadlineExceededError),
        (Code.UNAVAILABLE, UnavailableError),
        (Code.UNAUTHENTICATED, UnauthenticatedError),
        (Code.PERMISSION_DENIED, PermissionDeniedError),
        (Code.CANCELLED, RequestCancelledError),
        (Code.UNIMPLEMENTED, UnsupportedError),
        (Code.INTERNAL, InternalServerError),
        (Code.UNKNOWN, InternalServerError),
        (Code.FAILED_PRECONDITION, InferenceServerError),
    ],
)
def test_status_codes_map_to_exception_classes(code, cls):
    error = errors.make_error(code, "model 'x' says why")
    assert type(error) is cls
    assert isinstance(error, InferenceServerError)
    assert error.code is code
    assert error.details == "model 'x' says why"
    assert str(error) == f"{code.name}: model 'x' says why"


def test_exceptions_also_fit_builtin_families():
    assert isinstance(errors.make_error(Code.DEADLINE_EXCEEDED, "late"), TimeoutError)
    assert isinstance(errors.make_error(Code.UNAVAILABLE, "down"), ConnectionError)
    assert isinstance(errors.make_error(Code.INVALID_ARGUMENT, "bad"), ValueError)


def test_from_rpc_error_keeps_details_and_pushback():
    class FakeRpcError(grpc.RpcError):
        def code(self):
            return Code.RESOURCE_EXHAUSTED

        def details(self):
            return "queue of model 'm' is full (1024 waiting)"

        def trailing_metadata(self):
            return (("grpc-retry-pushback-ms", "250"),)

        def debug_error_string(self):
            return "debug"

    error = errors.from_rpc_error(FakeRpcError())
    assert isinstance(error, ServerBusyError)
    assert error.details == "queue of model 'm' is full (1024 waiting)"
    assert error.retry_after == pytest.approx(0.25)
    assert error.debug_error_string == "debug"


def test_errors_pickle_with_their_code():
    error = errors.make_error(Code.NOT_FOUND, "no model 'x'")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ModelNotFoundError and copy.code is Code.NOT_FOUND and copy.details == "no model 'x'"


def test_stream_error_messages_map_by_their_status_prefix():
    error = errors.from_stream_message("INVALID_ARGUMENT: input 'INPUT0' expects FP32, got INT32")
    assert isinstance(error, InvalidInputError)
    assert error.details == "input 'INPUT0' expects FP32, got INT32"
    plain = errors.from_stream_message("something odd: happened")
    assert type(plain) is InferenceServerError and plain.code is None
    assert str(plain) == "something odd: happened"


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("grpc-retry-pushback-ms", "100"),), 0.1),
        ((("grpc-retry-pushback-ms", b"0"),), 0.0),
        ((("grpc-retry-pushback-ms", "-1"),), None),
        ((("grpc-retry-pushback-ms", "soon"),), None),
        ((("other", "1"),), None),
        ((), None),
    ],
)
def test_pushback_parsing(metadata, expected):
    assert errors.pushback_s(metadata) == expected


# ------------------------------------------------------------------- retry


def test_never_sent_is_recognised_from_grpc_messages():
    assert never_sent(Code.UNAVAILABLE, REFUSED)
    assert never_sent(Code.UNAVAILABLE, RR_REFUSED)
    assert never_sent(Code.UNAVAILABLE, DNS_FAILED)
    assert not never_sent(Code.UNAVAILABLE, SOCKET_CLOSED)
    assert not never_sent(Code.UNAVAILABLE, "server is draining")
    assert not never_sent(Code.INTERNAL, REFUSED)
    assert connection_lost(Code.UNAVAILABLE, SOCKET_CLOSED)


def _retrier(policy: RetryPolicy | None = None, clock: FakeClock | None = None) -> Retrier:
    return Retrier(policy or RetryPolicy(), clock=clock or FakeClock(), rng=random.Random(7))


def test_only_safe_failures_are_retried():
    retrier = _retrier()
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 1, None) is not None
    assert retrier.next_delay(Code.UNAVAILABLE, SOCKET_CLOSED, (), 1, None) is None  # maybe executed
    assert retrier.next_delay(Code.UNAVAILABLE, "model 'm' is loading", (), 1, None) is None
    for code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.DEADLINE_EXCEEDED, Code.INTERNAL,
                 Code.UNAUTHENTICATED, Code.CANCELLED):
        assert retrier.next_delay(code, REFUSED, (("grpc-retry-pushback-ms", "5"),), 1, None) is None
    # RESOURCE_EXHAUSTED: only with a valid pushback, and then exactly that long.
    assert retrier.next_delay(Code.RESOURCE_EXHAUSTED, "queue full", (), 1, None) is None
    negative = (("grpc-retry-pushback-ms", "-5"),)
    assert retrier.next_delay(Code.RESOURCE_EXHAUSTED, "full", negative, 1, None) is None
    delay = retrier.next_delay(Code.RESOURCE_EXHAUSTED, "full", (("grpc-retry-pushback-ms", "375"),), 1, None)
    assert delay == pytest.approx(0.375)


def test_server_unavailable_is_retried_only_when_asked():
    retrier = _retrier(RetryPolicy(retry_server_unavailable=True))
    assert retrier.next_delay(Code.UNAVAILABLE, "model 'm' is loading", (), 1, None) is not None
    assert retrier.next_delay(Code.UNAVAILABLE, SOCKET_CLOSED, (), 1, None) is None


def test_backoff_is_exponential_capped_and_jittered():
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5, max_attempts=10)
    rng = random.Random(1)
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.backoff(attempt, rng) for _ in range(200)]
        assert all(base * 0.5 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base * 0.3  # really jittered
    assert RetryPolicy(jitter=0.0, initial_backoff=0.1).backoff(1) == pytest.approx(0.1)


def test_attempts_and_deadline_bound_the_retries():
    clock = FakeClock()
    retrier = _retrier(RetryPolicy(max_attempts=3, initial_backoff=0.1, jitter=0.0), clock)
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 1, None) == pytest.approx(0.1)
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 2, None) == pytest.approx(0.2)
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 3, None) is None  # 3 attempts made
    # A sleep that would end past the deadline is not taken.
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 1, clock.now + 0.05) is None
    assert retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 1, clock.now + 0.5) is not None
    pushback = (("grpc-retry-pushback-ms", "1000"),)
    assert retrier.next_delay(Code.RESOURCE_EXHAUSTED, "full", pushback, 1, clock.now + 0.5) is None
    assert retrier.retries == 3


def test_retry_budget_limits_retries_to_a_share_of_requests():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_second=0.0, window_s=10, clock=clock)
    assert not budget.try_spend()  # no requests, no reserve: nothing to spend
    for _ in range(100):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 10
    clock.now += 5
    assert not budget.try_spend()  # same window
    clock.now += 6  # the first second's requests and retries left the window
    for _ in range(20):
        budget.record_request()
    assert sum(budget.try_spend() for _ in range(10)) == 2


def test_retry_budget_reserve_lets_a_quiet_client_retry():
    clock = FakeClock()
    budget = RetryBudget(ratio=0.0, min_per_second=1.0, window_s=5, clock=clock)
    assert sum(budget.try_spend() for _ in range(20)) == 5
    clock.now += 5.5
    assert budget.try_spend()


def test_retrier_stops_when_the_budget_is_spent():
    clock = FakeClock()
    retrier = _retrier(RetryPolicy(max_attempts=100, budget_ratio=0.0, budget_min_per_second=0.2,
                                   budget_window_s=10), clock)
    delays = [retrier.next_delay(Code.UNAVAILABLE, REFUSED, (), 1, None) for _ in range(5)]
    assert sum(d is not None for d in delays) == 2


def test_policy_validation():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(initial_backoff=2, max_backoff=1)
    assert RetryPolicy.disabled().max_attempts == 1


# ----------------------------------------------------------------- tensors

FIXED = [name for name in codec.DATATYPES if name not in ("BYTES", "BF16")]


@pytest.mark.parametrize("datatype", FIXED)
def test_every_fixed_datatype_encodes_from_its_numpy_dtype(datatype):
    array = (np.arange(6) % 2).astype(codec.NUMPY_DTYPES[datatype]).reshape(2, 3)
    request = _convert.build_request("m", {"X": array})
    tensor = request.inputs[0]
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("X", datatype, [2, 3])
    assert request.raw_input_contents[0] == array.tobytes()


def test_bytes_inputs_from_str_bytes_and_object_arrays():
    for array in (np.array(["a", "", "ünï"]), np.array([b"a", b"", b"\xff"]),
                  np.array(["a", b"\x00b", "c"], dtype=object)):
        request = _convert.build_request("m", {"T": array})
        assert request.inputs[0].datatype == "BYTES"
        decoded = codec.decode_raw(request.raw_input_contents[0], "BYTES", [3])
        expected = [e if isinstance(e, bytes) else e.encode() for e in array.tolist()]
        assert decoded.tolist() == expected


def test_bf16_needs_an_explicit_option_and_rounds():
    values = np.array([[1.0, 1.00390625, 3.14159, -2.5]], np.float32)
    request = _convert.build_request("m", {"X": bf16(values), "Y": Tensor(values, "BF16"), "Z": values})
    assert [t.datatype for t in request.inputs] == ["BF16", "BF16", "FP32"]
    bits = np.frombuffer(request.raw_input_contents[0], "<u2")
    assert np.array_equal(bits, codec.float32_to_bf16_bits(values).ravel())
    ml_dtypes = pytest.importorskip("ml_dtypes")
    native = values.astype(ml_dtypes.bfloat16)
    request = _convert.build_request("m", {"X": native})
    assert request.inputs[0].datatype == "BF16"
    assert request.raw_input_contents[0] == native.tobytes()


def test_request_fields_parameters_and_outputs():
    request = _convert.build_request(
        "m", {"X": np.zeros((1, 2), np.float32)}, outputs=["A", "B"], version=3, priority=2,
        request_id="r-1", parameters={"flag": True, "n": -4, "big": 2**63 + 5, "x": 0.5, "s": "v"},
    )
    assert (request.model_name, request.model_version, request.id) == ("m", "3", "r-1")
    assert [o.name for o in request.outputs] == ["A", "B"]
    params = {
        k: (v.WhichOneof("parameter_choice"), _convert.param_value(v)) for k, v in request.parameters.items()
    }
    assert params == {
        "flag": ("bool_param", True), "n": ("int64_param", -4), "big": ("uint64_param", 2**63 + 5),
        "x": ("double_param", 0.5), "s": ("string_param", "v"), "priority": ("uint64_param", 2),
    }
    with_params = _convert.build_request("m", {}, outputs={"A": {"classification": 3}})
    assert with_params.outputs[0].parameters["classification"].int64_param == 3


@pytest.mark.parametrize(
    "inputs",
    [
        {"X": np.array([object()], dtype=object)},  # not bytes/str
        {"X": Tensor(np.array([1.5, 2.5]), "INT32")},  # float -> int would lose data
        {"X": Tensor(np.array([1.0]), "NOPE")},
        {"X": np.array([1 + 2j])},  # no v2 datatype
    ],
)
def test_bad_inputs_raise_invalid_input_before_sending(inputs):
    with pytest.raises(InvalidInputError, match="input 'X'"):
        _convert.build_request("m", inputs)


def test_bad_parameters_raise_invalid_input():
    with pytest.raises(InvalidInputError):
        _convert.build_request("m", {}, parameters={"p": [1]})
    with pytest.raises(InvalidInputError):
        _convert.build_request("m", {}, parameters={"p": 2**64})
    with pytest.raises(InvalidInputError):
        _convert.build_request("", {})


def test_responses_decode_zero_copy_with_typed_contents_fallback():
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    response = pb.ModelInferResponse(model_name="m", model_version="2", id="q")
    response.outputs.add(name="A", datatype="FP32", shape=[2, 3])
    response.raw_output_contents.append(values.tobytes())
    typed = response.outputs.add(name="B", datatype="INT32", shape=[3])
    typed.contents.int_contents.extend([7, 8, 9])
    response.parameters["note"].string_param = "hi"
    result = _convert.parse_response(response)
    assert list(result) == ["A", "B"] and len(result) == 2
    assert np.array_equal(result["A"], values) and result["A"].dtype == np.float32
    assert not result["A"].flags.writeable  # a view of the message's bytes
    assert result["B"].tolist() == [7, 8, 9]
    assert (result.model_name, result.model_version, result.id) == ("m", "2", "q")
    assert result.datatypes == {"A": "FP32", "B": "INT32"}
    assert result.parameters == {"note": "hi"}
    assert "FP32[2, 3]" in repr(result)
    with pytest.raises(KeyError, match="outputs: \\['A', 'B'\\]"):
        result["C"]


def test_bf16_outputs_follow_the_clients_choice():
    bits = codec.float32_to_bf16_bits(np.array([1.5, -2.0], np.float32))
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="Y", datatype="BF16", shape=[2])
    response.raw_output_contents.append(bits.tobytes())
    assert _convert.parse_response(response)["Y"].tolist() == [1.5, -2.0]
    assert _convert.parse_response(response, "bits")["Y"].dtype == np.uint16


def test_malformed_responses_are_server_errors():
    response = pb.ModelInferResponse(model_name="m")
    response.outputs.add(name="A", datatype="FP32", shape=[4])
    response.raw_output_contents.append(b"\x00" * 3)
    with pytest.raises(InternalServerError, match="malformed response from model 'm'"):
        _convert.parse_response(response)


# ---------------------------------------------------------------- channels


def test_targets_for_one_and_several_addresses():
    assert _channel.build_target(["example.com:9000"]) == ("example.com:9000", None)
    assert _channel.build_target(["example.com"]) == ("example.com:8001", None)
    assert _channel.build_target(["unix:/tmp/tw.sock"]) == ("unix:/tmp/tw.sock", None)
    assert _channel.build_target(["127.0.0.1:1", "127.0.0.2:2"]) == ("ipv4:127.0.0.1:1,127.0.0.2:2", None)
    assert _channel.build_target(["[::1]:1", "[::1]:2"]) == ("ipv6:[::1]:1,[::1]:2", None)
    target, name = _channel.build_target(["localhost:5", "127.0.0.1:6"])
    assert target.startswith("ipv4:127.0.0.1:5") and target.endswith("127.0.0.1:6") and name == "localhost"
    assert _channel.split_addresses(" a:1, b:2 ,") == ["a:1", "b:2"]
    with pytest.raises(ValueError):
        _channel.split_addresses("")


def test_channel_options_limits_round_robin_token_and_compression():
    spec = _channel.channel_spec(
        "127.0.0.1:1,127.0.0.1:2", tls=None, token="s3cret", compression="gzip",
        keepalive=_channel.KeepAlive(),
        max_message_bytes=2**31 - 1, load_balancing=None, retry=RetryPolicy(), options=[("x.custom", 1)],
        user_agent="ua",
    )
    options = dict(spec.options)
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 2**31 - 1
    assert json.loads(options["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert options["grpc.keepalive_time_ms"] == 60000 and options["x.custom"] == 1
    assert spec.metadata == (("authorization", "Bearer s3cret"),)
    assert spec.compression is grpc.Compression.Gzip and spec.credentials is None
    single = _channel.channel_spec(
        "127.0.0.1:1", tls=None, token=None, compression=None, keepalive=None, max_message_bytes=10,
        load_balancing=None, retry=RetryPolicy(), options=(), user_agent="ua",
    )
    assert "grpc.service_config" not in dict(single.options) and single.metadata is None
    with pytest.raises(ValueError):
        _channel.compression_of("brotli")


def test_tls_config_reads_files_and_requires_key_with_cert(tmp_path):
    with pytest.raises(ValueError, match="both"):
        TLSConfig(cert_file="c.pem")
    with pytest.raises(FileNotFoundError):
        TLSConfig(ca_file=tmp_path / "missing.pem").credentials()


def test_closed_client_raises_our_error():
    client = InferenceClient("127.0.0.1:1")
    with client:
        pass
    with pytest.raises(RequestCancelledError):
        client.server_live()


def test_unreachable_server_is_unavailable_after_retries():
    client = InferenceClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01,
                                                              max_backoff=0.02))
    with client, pytest.raises(UnavailableError, match="failed to connect"):
        client.server_live(timeout=5)
    assert client.retries == 2


# ------------------------------------------------------------------ the CLI


def test_cli_reads_npy_npz_and_json_inputs(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    np.savez(tmp_path / "b.npz", B=np.arange(3), C=np.zeros(2))
    (tmp_path / "d.json").write_text(json.dumps({"D": [[1, 2]]}))
    (tmp_path / "e.json").write_text(json.dumps(
        {"inputs": [{"name": "E", "datatype": "INT16", "shape": [2, 1], "data": [5, 6]},
                    {"name": "F", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}
    ))
    inputs = cli._load_inputs([f"A={tmp_path / 'a.npy'}", str(tmp_path / "b.npz"), str(tmp_path / "d.json"),
                               str(tmp_path / "e.json")])
    assert sorted(inputs) == ["A", "B", "C", "D", "E", "F"]
    assert inputs["E"].dtype == np.int16 and inputs["E"].shape == (2, 1)
    assert inputs["F"].tolist() == ["hi"]
    with pytest.raises(ValueError, match="needs an input name"):
        cli._load_inputs([str(tmp_path / "a.npy")])


def test_cli_conforms_inputs_to_model_metadata():
    meta = pb.ModelMetadataResponse()
    meta.inputs.add(name="X", datatype="FP32", shape=[-1, 3])
    meta.inputs.add(name="T", datatype="BYTES", shape=[-1])
    meta.inputs.add(name="H", datatype="BF16", shape=[2])
    out = cli._conform({"X": np.array([1, 2, 3]), "T": np.array(["a"]), "H": np.array([1.0, 2.0])},
                       meta.inputs, set())
    assert out["X"].dtype == np.float32 and out["X"].shape == (1, 3)
    assert out["T"].tolist() == ["a"]
    assert isinstance(out["H"], Tensor) and out["H"].datatype == "BF16"


# ---------------------------------------------------------------- footprint


def test_importing_the_client_loads_no_server_trainer_torch_or_onnxruntime():
    forbidden = ["torch", "onnxruntime", "onnx", "pydantic", "tensorwire.server", "tensorwire.trainer",
                 "tensorwire.repository"]
    code = (
        "import sys, json\n"
        "import tensorwire.client, tensorwire.client.cli, tensorwire.client.aio\n"
        "from tensorwire.client import InferenceClient, AsyncInferenceClient\n"
        f"print(json.dumps([m for m in {forbidden!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
