"""Triton compatibility where clients depend on it: probes answer as Triton does, an output named twice is
refused, every datatype passes bit-exact through an identity model, and the queue-full retry hint comes
from the measured service rate. Triton's own client (tritonclient.grpc) where it applies."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from infer_helpers import InputTensor, infer_request
from model_factory import onnx_identity, python_model, sleeper_model
from serving import call, running_server
from tritonclient.utils import InferenceServerException

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import CONTENTS_FIELD, DATATYPES, ELEMENT_SIZE, serialize_bytes_tensor
from tensorwire.proto.service import METHODS

PYTHON_IDENTITY = """
class Model:
    def execute(self, inputs):
        return {"OUTPUT0": inputs["INPUT0"]}
"""
INTEGERS = ("UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64")


def special_values(datatype: str) -> bytes:
    """Raw little-endian bytes of values a lossy path would change (NaN payloads, -0.0, subnormals, extremes)."""
    rng = np.random.default_rng(7)
    if datatype == "BOOL":
        raw = bytes([0, 1, 1, 0])
    elif datatype in INTEGERS:
        info = np.iinfo(np.dtype(datatype.lower()))
        values = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1], dtype=np.dtype(datatype.lower()))
        raw = values.astype(values.dtype.newbyteorder("<")).tobytes()
    elif datatype in ("FP16", "BF16"):
        raw = np.arange(2**16, dtype=np.uint32).astype("<u2").tobytes()  # every pattern: NaN payloads, -0, ...
    elif datatype == "FP32":
        specials = [0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC00001, 0xFFFFFFFF, 0x80000000, 0x00000001]
        specials += [0x807FFFFF, 0x7F800000, 0xFF800000, 0x3F800000]
        bits = np.concatenate([np.array(specials, "<u4"), rng.integers(0, 2**32, 4096, dtype=np.uint64).astype("<u4")])
        raw = bits.tobytes()
    elif datatype == "FP64":
        specials = [0x7FF0000000000001, 0xFFF8000000000001, 0x8000000000000000, 0x0000000000000001]
        specials += [0x7FF0000000000000, 0x000FFFFFFFFFFFFF]
        bits = np.concatenate([np.array(specials, "<u8"), rng.integers(0, 2**63, 1024, dtype=np.uint64).astype("<u8")])
        raw = bits.tobytes()
    else:
        raise AssertionError(datatype)
    return raw


def element_count(datatype: str, raw: bytes) -> int:
    return len(raw) // ELEMENT_SIZE[datatype]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "models"
    for datatype in DATATYPES:
        onnx_identity(repo, f"onnx_{datatype.lower()}", datatype=datatype, dims=[-1], max_batch_size=8, warmup="none")
        tensor = {"datatype": datatype, "dims": [-1]}
        python_model(
            repo,
            f"python_{datatype.lower()}",
            PYTHON_IDENTITY,
            {
                "max_batch_size": 8,
                "warmup": "none",
                "inputs": [{"name": "INPUT0", **tensor}],
                "outputs": [{"name": "OUTPUT0", **tensor}],
            },
        )
    onnx_identity(repo, "identity", dims=[4], max_batch_size=8)
    sleeper_model(repo, name="queue32", max_batch_size=1, dynamic_batching={"max_queue_size": 32})
    with running_server(repo, "--drain-seconds", "0") as srv:
        yield srv


# --------------------------------------------------------------------- probes


def test_probes_answer_as_triton_does(server):
    client = triton.InferenceServerClient(server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("identity") and client.is_model_ready("identity", "1")
    assert client.is_model_ready("identity", "7") is False  # a version that does not exist: not an error
    assert client.is_model_ready("no_such_model") is False
    assert client.is_model_ready("no_such_model", "3") is False
    with pytest.raises(InferenceServerException) as caught:
        client.is_model_ready("identity", "-1")  # Triton: INVALID_ARGUMENT, "version should be ... > 0"
    assert "INVALID_ARGUMENT" in str(caught.value.status())
    assert client.get_server_metadata().name == "tensorwire"
    assert any(m.name == "identity" for m in client.get_model_repository_index().models)


def test_an_output_named_twice_is_refused(server):
    client = triton.InferenceServerClient(server.address)
    x = triton.InferInput("INPUT0", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    twice = [triton.InferRequestedOutput("OUTPUT0"), triton.InferRequestedOutput("OUTPUT0")]
    with pytest.raises(InferenceServerException) as caught:
        client.infer("identity", [x], outputs=twice)
    assert "INVALID_ARGUMENT" in str(caught.value.status()) and "requested twice" in caught.value.message()
    assert client.infer("identity", [x], outputs=twice[:1]).as_numpy("OUTPUT0").tolist() == [[1, 1, 1, 1]]


def test_model_version_minus_one_is_invalid_argument_saying_what_triton_does(server):
    request = infer_request("identity", {"INPUT0": np.ones((1, 4), np.float32)}, version="-1")
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        call(channel, "ModelInfer", request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Triton refuses it too" in caught.value.details()


# ----------------------------------------------------------- bit exactness


@pytest.mark.parametrize("backend", ["onnx", "python"])
@pytest.mark.parametrize("datatype", [d for d in DATATYPES if d != "BYTES"])
def test_every_fixed_size_datatype_passes_bit_exact_through_an_identity_model(server, backend, datatype):
    raw = special_values(datatype)
    n = element_count(datatype, raw)
    request = pb.ModelInferRequest(model_name=f"{backend}_{datatype.lower()}", id="exact")
    request.inputs.append(InputTensor(name="INPUT0", datatype=datatype, shape=[1, n]))
    request.raw_input_contents.append(raw)
    with server.channel() as channel:
        response = call(channel, "ModelInfer", request)
    (output,) = response.outputs
    assert (output.datatype, list(output.shape)) == (datatype, [1, n])
    assert response.raw_output_contents[0] == raw, "the identity model changed some bits"


@pytest.mark.parametrize("backend", ["onnx", "python"])
def test_bytes_pass_exact_through_an_identity_model(server, backend):
    elements = ["", "\x00", "ü", "\U0001f600", "x" * 1000]
    data = [e.encode() for e in elements]
    if backend == "python":  # ONNX string tensors hold text; a Python model takes any bytes
        data += [b"\xff\xfe\x00", bytes(range(256))]
    raw = serialize_bytes_tensor(np.array(data, dtype=object))
    request = pb.ModelInferRequest(model_name=f"{backend}_bytes")
    request.inputs.append(InputTensor(name="INPUT0", datatype="BYTES", shape=[1, len(data)]))
    request.raw_input_contents.append(raw)
    with server.channel() as channel:
        response = call(channel, "ModelInfer", request)
    assert response.raw_output_contents[0] == raw


def test_fp32_typed_contents_pass_bit_exact(server):
    """Typed contents read through Python floats would quiet a signalling NaN; the server reads the bytes."""
    raw = special_values("FP32")
    n = element_count("FP32", raw)
    field = pb.InferTensorContents.DESCRIPTOR.fields_by_name[CONTENTS_FIELD["FP32"]].number
    length = len(raw)
    varint = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        varint.append(byte | (0x80 if length else 0))
        if not length:
            break
    contents = pb.InferTensorContents.FromString(bytes([field << 3 | 2]) + bytes(varint) + raw)
    request = pb.ModelInferRequest(model_name="python_fp32")
    request.inputs.append(InputTensor(name="INPUT0", datatype="FP32", shape=[1, n], contents=contents))
    with server.channel() as channel:
        response = call(channel, "ModelInfer", request)
    assert response.raw_output_contents[0] == raw


# ------------------------------------------------------------ retry hint


def test_queue_full_retry_hint_follows_the_measured_service_time(server):
    """Runs take 200 ms on one replica and 32 requests wait: the queue needs about 6.4 s to clear, and the
    refused requests of a burst hear so (the hint used to follow the arrival rate: a burst made it a few ms
    while every run took hundreds)."""
    m = METHODS["ModelInfer"]

    def request(ident: int) -> pb.ModelInferRequest:
        inputs = {"ID": np.array([[ident]], np.int64), "SLEEP_MS": np.array([[200]], np.float32)}
        return infer_request("queue32", inputs, request_id=str(ident))

    with server.channel() as channel:
        stub = channel.unary_unary(
            m.path, request_serializer=m.request.SerializeToString, response_deserializer=m.response.FromString
        )
        stub(request(400), timeout=30)  # one measured run
        burst = [stub.future(request(i), timeout=60) for i in range(401, 441)]
        hints = []
        for future in burst[33:]:  # one runs, 32 queue: the rest are refused
            try:
                future.result()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                hints.append(int(dict(err.trailing_metadata())["grpc-retry-pushback-ms"]))
        for future in burst:
            future.cancel()  # withdrawn from the queue: they never run
    assert hints, "no request was refused"
    assert all(3000 <= hint <= 20_000 for hint in hints), hints
