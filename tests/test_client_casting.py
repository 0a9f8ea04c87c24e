"""One rule for fitting inputs to a model's declared datatypes, the same in the SDK and the CLI.

The rule (client/_casting.py, README "Sending inputs"): exact matches go as they are;
widening within a family is done; numpy's default float64/int64 and Python numbers adapt
when every value survives (floats: the value or its shortest decimal form); anything else
is refused with an error naming the input, both datatypes and the explicit form.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from client_models import identity_name
from model_factory import onnx_add_sub, onnx_identity, sleeper_model
from serving import running_server

from tensorwire.cli import main as tensorwire_main
from tensorwire.client import AsyncInferenceClient, InferenceClient, InvalidInputError, Tensor, cli
from tensorwire.client._casting import conform
from tensorwire.proto import inference_pb2 as pb

# (value, declared datatype, expected numpy dtype of what is sent)
ACCEPTED = [
    (np.zeros((1, 1, 8, 8)), "FP32", np.float32),  # float64 zeros: exact
    ([[0.1, 0.25, -3.0]], "FP32", np.float32),  # decimals keep their shortest form
    (np.array([0.1, 1e-40]), "FP32", np.float32),  # a subnormal too
    (np.array([np.nan, np.inf, -0.0]), "FP16", np.float16),  # NaN, inf and signed zero survive
    ([[1, 2, 3]], "FP32", np.float32),  # Python ints
    (np.arange(3), "INT8", np.int8),  # int64 values in range
    ([1.0, -2.0], "INT64", np.int64),  # integral floats
    ([1, 0], "BOOL", np.bool_),
    (np.float16([1.5]), "FP32", np.float32),  # widening within floats
    (np.uint8([200]), "INT32", np.int32),  # widening within integers
    (np.float32([1.5]), "FP64", np.float64),
    (2**63 - 1, "INT64", np.int64),  # a Python scalar
]

# (value, declared datatype, original value shown in the message or None)
REFUSED = [
    (np.array([1 / 3]), "FP32", "0.3333333333333333"),  # rounding
    (np.random.default_rng(0).random(8), "FP32", None),
    (np.array([1e300]), "FP32", "1e+300"),  # would overflow to inf
    ([2**40], "INT32", "1099511627776"),  # out of range
    ([1.5], "INT64", "1.5"),  # a float that is not integral
    ([2], "BOOL", "2"),
    (np.zeros((1, 16), np.int32), "FP32", None),  # a chosen integer type for a float input
    (np.uint8([0, 255]), "FP32", None),  # 0-255 pixels for a float model: asked for, or refused
    (np.float32([0.1]), "FP16", None),  # narrowing a chosen float type
    (np.array([True]), "INT32", None),
    ([0.1], "BF16", "0.1"),  # BF16 keeps about 3 digits
    (["a"], "FP32", None),  # text for numbers
    ([1, 2], "BYTES", None),  # numbers for text
]


@pytest.mark.parametrize(("value", "datatype", "dtype"), ACCEPTED)
def test_values_that_survive_are_fitted(value, datatype, dtype):
    sent = conform("X", value, datatype)
    assert sent.dtype == dtype
    original = np.asarray(value)
    if original.dtype.kind == "f" and sent.dtype.kind == "f":  # the value, or its shortest decimal form
        assert np.array_equal(sent.astype(str).astype(original.dtype), original, equal_nan=True)
    else:
        assert np.array_equal(sent.astype(original.dtype), original)


@pytest.mark.parametrize(("value", "datatype", "shown"), REFUSED)
def test_values_that_would_change_are_refused_with_a_clear_error(value, datatype, shown):
    with pytest.raises(InvalidInputError) as info:
        conform("X", value, datatype)
    message = info.value.details
    assert "input 'X'" in message and datatype in message
    if shown is not None:
        assert shown in message
    if datatype not in ("BYTES",) and np.asarray(value).dtype.kind not in "US":
        assert "Tensor(value" in message or "astype" in message  # how to ask for it explicitly


def test_exact_matches_are_sent_without_a_copy_and_explicit_tensors_as_asked():
    array = np.ones((2, 3), np.float32)
    assert conform("X", array, "FP32") is array
    explicit = Tensor(np.array([1 / 3]), "FP32")
    assert conform("X", explicit, "FP32") is explicit  # asked for: the codec rounds it
    bf16 = conform("X", np.array([1.0, -2.5]), "BF16")
    assert isinstance(bf16, Tensor) and bf16.datatype == "BF16"


@pytest.mark.parametrize(("value", "datatype", "dtype"), ACCEPTED)
def test_the_cli_applies_the_same_rule(value, datatype, dtype):
    meta = pb.ModelMetadataResponse()
    meta.inputs.add(name="X", datatype=datatype, shape=list(np.shape(value)) or [1])
    assert cli._conform({"X": value}, meta.inputs, set())["X"].dtype == dtype


@pytest.mark.parametrize(("value", "datatype", "shown"), REFUSED)
def test_the_cli_refuses_the_same_values_and_names_its_flag(value, datatype, shown):
    meta = pb.ModelMetadataResponse()
    meta.inputs.add(name="X", datatype=datatype, shape=list(np.shape(value)) or [1])
    with pytest.raises(InvalidInputError, match="--cast X"):
        cli._conform({"X": value}, meta.inputs, set())


def test_the_cli_casts_when_asked():
    meta = pb.ModelMetadataResponse()
    meta.inputs.add(name="X", datatype="FP32", shape=[-1, 2])
    out = cli._conform({"X": np.array([1 / 3, 2 / 3])}, meta.inputs, set(), {"X"})
    assert out["X"] == Tensor(out["X"].data, "FP32") and out["X"].data.shape == (1, 2)


# ------------------------------------------------------------ against a server


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("casting") / "models"
    onnx_identity(repo, "image", dims=[1, 8, 8], max_batch_size=4, warmup="none")
    onnx_identity(repo, "identity", dims=[16], max_batch_size=8, warmup="none")
    onnx_identity(repo, identity_name("INT32"), datatype="INT32", dims=[3], max_batch_size=4, warmup="none")
    onnx_identity(repo, "shifty", dims=[2], max_batch_size=4, warmup="none")
    onnx_add_sub(repo, "add_sub", max_batch_size=4, warmup="none")
    sleeper_model(repo, "sleeper", max_batch_size=4)
    return repo


@pytest.fixture(scope="module")
def server(repo):
    with running_server(repo, "--drain-seconds", "0") as running:
        yield running


def test_sdk_fits_float64_arrays_and_python_lists(server):
    with InferenceClient(server.address, timeout=30) as client:
        out = client.infer("image", {"INPUT0": np.zeros((1, 1, 8, 8))})["OUTPUT0"]
        assert out.dtype == np.float32 and out.shape == (1, 1, 8, 8)
        out = client.infer("identity", {"INPUT0": [[0.1] * 16]})["OUTPUT0"]
        assert np.array_equal(out, np.full((1, 16), 0.1, np.float32))
        out = client.infer(identity_name("INT32"), {"INPUT0": np.array([[1, -2, 3]])})["OUTPUT0"]
        assert out.dtype == np.int32 and out.tolist() == [[1, -2, 3]]
        ids = client.infer("sleeper", {"ID": [[7]], "SLEEP_MS": [[0]]})["ID_OUT"]
        assert ids.tolist() == [[7]]


def test_sdk_refuses_lossy_values_before_sending(server):
    with InferenceClient(server.address, timeout=30) as client:

        def failures() -> int:
            return sum(s.inference_stats.fail.count for s in client.model_statistics("identity").model_stats)

        before = failures()
        with pytest.raises(InvalidInputError) as info:
            client.infer("identity", {"INPUT0": np.random.default_rng(1).random((1, 16))})
        assert "input 'INPUT0'" in info.value.details and "FP32" in info.value.details
        assert 'Tensor(value, "FP32")' in info.value.details
        with pytest.raises(InvalidInputError, match="INT32"):
            client.infer(identity_name("INT32"), {"INPUT0": [[2**40, 0, 0]]})
        assert failures() == before  # refused here: nothing reached the server
        rounded = client.infer("identity", {"INPUT0": Tensor(np.full((1, 16), 1 / 3), "FP32")})["OUTPUT0"]
        assert rounded[0, 0] == np.float32(1 / 3)  # asked for explicitly: rounded


def test_a_bare_array_is_the_input_of_a_single_input_model(server):
    with InferenceClient(server.address, timeout=30) as client:
        out = client.infer("image", np.zeros((2, 1, 8, 8)))
        assert out["OUTPUT0"].shape == (2, 1, 8, 8)
        assert client.infer("identity", [[1.5] * 16])["OUTPUT0"][0, 0] == 1.5
        with pytest.raises(InvalidInputError, match=r"2 inputs \(INPUT0, INPUT1\)"):
            client.infer("add_sub", np.ones((1, 16), np.float32))
        with client.stream("identity") as stream:
            futures = list(stream.map(np.full((1, 16), i, np.float32) for i in range(5)))
        assert [f.result()["OUTPUT0"][0, 0] for f in futures] == list(range(5))


def test_async_client_applies_the_same_rule(server):
    async def main() -> None:
        async with AsyncInferenceClient(server.address, timeout=30) as client:
            out = await client.infer("image", np.zeros((1, 1, 8, 8)))
            assert out["OUTPUT0"].dtype == np.float32
            with pytest.raises(InvalidInputError, match="add_sub"):
                await client.infer("add_sub", [[1.0] * 16])
            with pytest.raises(InvalidInputError, match="input 'INPUT0'"):
                await client.infer("identity", {"INPUT0": np.zeros((1, 16), np.int32)})
            async with client.stream("identity") as stream:
                future = await stream.submit([[2.0] * 16])
                assert (await future)["OUTPUT0"][0, 0] == 2.0

    asyncio.run(main())


def test_a_reload_with_other_datatypes_is_followed(server, repo):
    """Another client reloads ``shifty`` from FP32 to FP64 inputs; this client's cached metadata
    is outdated, yet its next calls go out as the new model wants."""
    with InferenceClient(server.address, timeout=30) as client, InferenceClient(server.address) as admin:
        assert client.infer("shifty", np.zeros((1, 2)))["OUTPUT0"].dtype == np.float32  # FP32, cached
        onnx_identity(repo, "shifty", datatype="FP64", dims=[2], max_batch_size=4, warmup="none", version=2)
        admin.load_model("shifty")
        # zeros fit the outdated FP32: sent as FP32, refused, metadata refreshed, sent again as FP64
        out = client.infer("shifty", np.zeros((1, 2)))
        assert out["OUTPUT0"].dtype == np.float64 and out.model_version == "2"
        # and a value FP32 cannot hold is checked against the new FP64, not refused
        assert client.infer("shifty", np.full((1, 2), 1 / 3))["OUTPUT0"][0, 0] == 1 / 3


def test_cli_infer_uses_the_rule_and_cast_asks_for_rounding(server, capsys, tmp_path):
    np.save(tmp_path / "noise.npy", np.random.default_rng(2).random(16))
    code = tensorwire_main(["infer", "-a", server.address, "-m", "identity", f"INPUT0={tmp_path / 'noise.npy'}"])
    err = capsys.readouterr().err
    assert code == 1 and "--cast INPUT0" in err and "FP32" in err
    code = tensorwire_main(
        ["infer", "-a", server.address, "-m", "identity", f"INPUT0={tmp_path / 'noise.npy'}", "--cast", "INPUT0"]
    )
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["outputs"]["OUTPUT0"]["datatype"] == "FP32"
    (tmp_path / "in.json").write_text(json.dumps({"INPUT0": [0.1] * 16}))
    code = tensorwire_main(["infer", "-a", server.address, "-m", "identity", str(tmp_path / "in.json")])
    document = json.loads(capsys.readouterr().out)
    assert code == 0 and document["outputs"]["OUTPUT0"]["shape"] == [1, 16]
    code = tensorwire_main(
        ["infer", "-a", server.address, "-m", "identity", f"INPUT0={tmp_path / 'noise.npy'}", "--no-conform"]
    )
    assert code == 1 and "FP64" in capsys.readouterr().err  # sent as it is: the server refuses
