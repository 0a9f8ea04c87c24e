"""The client SDK against the real server on loopback: every RPC and datatype, streams, errors, deadlines."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from client_models import ALL_DATATYPES, client_repo, identity_name
from serving import running_server

from tensorwire.client import (
    AsyncInferenceClient,
    DeadlineExceededError,
    InferenceClient,
    InferenceServerError,
    InvalidInputError,
    ModelNotFoundError,
    RequestCancelledError,
    RetryPolicy,
    Tensor,
)
from tensorwire.proto import codec
from tensorwire.proto import inference_pb2 as pb

ONE = {"INPUT0": np.arange(16, dtype=np.float32).reshape(1, 16)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = client_repo(tmp_path_factory.mktemp("client") / "models")
    with running_server(repo, "--drain-seconds", "0") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with InferenceClient(server.address, timeout=20) as sdk:
        yield sdk


def sample(datatype: str, rows: int = 2) -> np.ndarray | Tensor:
    """A [rows, 3] array of ``datatype`` with values that exercise its range."""
    if datatype == "BYTES":
        rows_ = [[b"", b"a\x00b", "ünïcode".encode()], [b"\t", b"x" * 1000, b"z"]]
        return np.array(rows_[:rows], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]][:rows])
    if datatype == "BF16":
        return Tensor(np.array([[1.0, -2.5, 3.140625], [0.0, 1e30, -1e-30]][:rows], np.float32), "BF16")
    dtype = codec.NUMPY_DTYPES[datatype]
    if dtype.kind == "f":
        info = np.finfo(dtype)
        values = [[0.0, -1.5, float(info.max)], [float(info.tiny), 3.25, -float(info.max)]]
    else:
        info = np.iinfo(dtype)
        values = [[0, int(info.min), int(info.max)], [1, 2, int(info.max) - 1]]
    return np.array(values[:rows], dtype=dtype)


# --------------------------------------------------------------- every RPC


def test_health_and_metadata_rpcs(client):
    assert client.server_live() is True
    assert client.server_ready() is True
    assert client.model_ready("identity") is True
    assert client.model_ready("identity", 1) is True
    meta = client.server_metadata()
    assert meta.name == "tensorwire" and "statistics" in meta.extensions
    model = client.model_metadata("identity")
    assert model.name == "identity" and list(model.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("INPUT0", "FP32", [-1, 16])]
    config = client.model_config("identity")
    assert isinstance(config, pb.ModelConfig)
    assert config.name == "identity" and config.max_batch_size == 8 and list(config.input[0].dims) == [16]


def test_statistics_count_inferences(client):
    def successes() -> int:
        stats = client.model_statistics("add_sub")
        return sum(s.inference_stats.success.count for s in stats.model_stats)

    before = successes()
    for _ in range(3):
        ones = np.ones((1, 16), np.float32)
        client.infer("add_sub", {"INPUT0": ones, "INPUT1": ones})
    assert successes() == before + 3
    everything = client.model_statistics()
    assert {"identity", "add_sub"} <= {s.name for s in everything.model_stats}


def test_repository_index_load_and_unload(client):
    index = {m.name: m for m in client.repository_index()}
    assert index["spare"].state == "READY" and identity_name("BYTES") in index
    assert all(m.state == "READY" for m in client.repository_index(ready=True))
    client.unload_model("spare")
    assert "spare" not in {m.name for m in client.repository_index(ready=True)}
    with pytest.raises((ModelNotFoundError, InferenceServerError)):
        client.infer("spare", {"INPUT0": np.ones((1, 4), np.float32)})
    client.load_model("spare")
    assert client.model_ready("spare")
    assert client.infer("spare", {"INPUT0": np.ones((1, 4), np.float32)})["OUTPUT0"].sum() == 4


# ---------------------------------------------------------------- inference


def test_infer_returns_numpy_with_ids_and_selected_outputs(client):
    result = client.infer("identity", ONE, request_id="req-7", version=1, priority=0)
    assert (result.model_name, result.model_version, result.id) == ("identity", "1", "req-7")
    assert np.array_equal(result["OUTPUT0"], ONE["INPUT0"]) and result["OUTPUT0"].dtype == np.float32
    a, b = np.full((2, 16), 5, np.float32), np.full((2, 16), 2, np.float32)
    both = client.infer("add_sub", {"INPUT0": a, "INPUT1": b})
    assert sorted(both) == ["OUTPUT0", "OUTPUT1"]
    assert np.array_equal(both["OUTPUT0"], a + b) and np.array_equal(both["OUTPUT1"], a - b)
    only = client.infer("add_sub", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
    assert list(only) == ["OUTPUT1"] and np.array_equal(only["OUTPUT1"], a - b)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_every_datatype_round_trips(client, datatype):
    sent = sample(datatype)
    result = client.infer(identity_name(datatype), {"INPUT0": sent})
    out = result["OUTPUT0"]
    assert result.datatypes["OUTPUT0"] == datatype
    if datatype == "BYTES":
        assert out.dtype == object and out.tolist() == sent.tolist()
    elif datatype == "BF16":
        expected = codec.bf16_bits_to_float32(codec.float32_to_bf16_bits(sent.data))
        assert out.dtype == np.float32 and np.array_equal(out, expected)
    else:
        assert out.dtype == sent.dtype and np.array_equal(out, sent)


def test_binary_bytes_elements_round_trip(client):
    binary = np.array([[b"\xff\xfe\x00", b"", bytes(range(256))]], dtype=object)
    out = client.infer("bytes_echo", {"INPUT0": binary})["OUTPUT0"]
    assert out.dtype == object and out.tolist() == binary.tolist()


def test_messages_past_grpcs_4_mib_default_pass_and_gzip_works(server):
    big = np.array([[bytes(range(256)) * (24 * 1024)]], dtype=object)  # 6 MiB, one element
    for compression in (None, "gzip"):
        with InferenceClient(server.address, compression=compression) as sdk:
            assert sdk.infer("bytes_echo", {"INPUT0": big})["OUTPUT0"][0, 0] == big[0, 0]
            assert sdk.infer("identity", ONE)["OUTPUT0"].shape == (1, 16)


def test_bytes_from_str_arrays(client):
    words = np.array([["a", "bb", "ccc"]])
    out = client.infer(identity_name("BYTES"), {"INPUT0": words})["OUTPUT0"]
    assert out.tolist() == [[b"a", b"bb", b"ccc"]]


def test_bf16_as_ml_dtypes_both_ways(server):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with InferenceClient(server.address, bf16_as="bfloat16") as sdk:
        native = np.array([[1.5, -2.0, 0.25]], dtype=ml_dtypes.bfloat16)
        out = sdk.infer(identity_name("BF16"), {"INPUT0": native})["OUTPUT0"]
        assert out.dtype == native.dtype and np.array_equal(out, native)


# ------------------------------------------------------------------- errors


def test_errors_are_mapped_and_keep_the_servers_explanation(client):
    with pytest.raises(ModelNotFoundError, match="nope"):
        client.infer("nope", ONE)
    with pytest.raises(ModelNotFoundError):
        client.model_metadata("identity", version=99)
    with pytest.raises(InvalidInputError) as wrong_type:
        client.infer("identity", {"INPUT0": np.zeros((1, 16), np.int32)})
    assert "INPUT0" in wrong_type.value.details
    with pytest.raises(InvalidInputError, match="INPUT0"):
        client.infer("identity", {"INPUT0": np.zeros((1, 15), np.float32)})


def test_invalid_argument_is_not_retried(client):
    """Counted server-side: one failed request in the model's statistics, not several."""

    def failures() -> int:
        return sum(s.inference_stats.fail.count for s in client.model_statistics("identity").model_stats)

    before, retries = failures(), client.retries
    with pytest.raises(InvalidInputError):
        client.infer("identity", {"INPUT0": np.zeros((1, 3), np.float32)})
    assert failures() == before + 1
    assert client.retries == retries


def test_deadlines_raise_deadline_exceeded(client):
    slow = {"ID": np.array([[1]], np.int64), "SLEEP_MS": np.array([[1500]], np.float32)}
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        client.infer("sleeper", slow, timeout=0.3)
    assert time.monotonic() - started < 1.2
    assert isinstance(info.value, TimeoutError)
    fast = {"ID": np.array([[2]], np.int64), "SLEEP_MS": np.array([[0]], np.float32)}
    assert client.infer("sleeper", fast, timeout=10)["ID_OUT"].tolist() == [[2]]


# ---------------------------------------------------------------- streaming


def test_stream_of_1000_requests_returns_all_in_order(client):
    with client.stream("identity", max_in_flight=64) as stream:
        futures = list(stream.map({"INPUT0": np.full((1, 16), i, np.float32)} for i in range(1000)))
    assert len(futures) == 1000
    values = [f.result()["OUTPUT0"][0, 0] for f in futures]
    assert values == list(range(1000))


def test_stream_error_surfaces_on_its_item_only(client):
    def requests():
        for i in range(20):
            if i == 10:
                yield {"INPUT0": np.zeros((1, 3), np.float32)}  # wrong shape
            else:
                yield {"INPUT0": np.full((1, 16), i, np.float32)}

    with client.stream("identity") as stream:
        futures = list(stream.map(requests()))
        after = stream.submit({"INPUT0": np.full((1, 16), 99, np.float32)}).result(timeout=10)
    for i, future in enumerate(futures):
        if i == 10:
            with pytest.raises(InvalidInputError, match="INPUT0"):
                future.result()
        else:
            assert future.result()["OUTPUT0"][0, 0] == i
    assert after["OUTPUT0"][0, 0] == 99


def test_stream_to_an_unknown_model_fails_each_item_and_stays_open(client):
    with client.stream("missing") as stream:
        first = stream.submit(ONE)
        second = stream.submit(ONE)
        with pytest.raises(ModelNotFoundError):
            first.result(timeout=10)
        with pytest.raises(ModelNotFoundError):
            second.result(timeout=10)


def test_stream_ids_and_bad_local_inputs(client):
    with client.stream("identity") as stream:
        with pytest.raises(InvalidInputError):
            stream.submit({"INPUT0": np.array([1 + 1j])})  # never sent
        result = stream.submit(ONE, request_id="s-1").result(timeout=10)
    assert result.id == "s-1"


def test_stream_submit_from_many_threads_matches_each_answer_to_its_request(client):
    def worker(stream, base: int) -> list[tuple[int, object]]:
        values = [base + i for i in range(100)]
        sent = [(value, stream.submit({"INPUT0": np.full((1, 16), value, np.float32)})) for value in values]
        return [(value, future.result(timeout=30)["OUTPUT0"][0, 0]) for value, future in sent]

    with client.stream("identity", max_in_flight=8) as stream, ThreadPoolExecutor(4) as pool:
        # A map in this thread and submits from four others share the stream.
        mapped = stream.map({"INPUT0": np.full((1, 16), -i, np.float32)} for i in range(1, 101))
        jobs = [pool.submit(worker, stream, base) for base in (1000, 2000, 3000, 4000)]
        assert [f.result()["OUTPUT0"][0, 0] for f in mapped] == [-i for i in range(1, 101)]
        for job in jobs:
            assert all(value == got for value, got in job.result())


def test_stream_cancel_fails_pending_items(client):
    slow = {"ID": np.array([[4]], np.int64), "SLEEP_MS": np.array([[500]], np.float32)}
    stream = client.stream("sleeper")
    futures = [stream.submit(slow) for _ in range(3)]
    stream.cancel()
    for future in futures:
        with pytest.raises(RequestCancelledError):
            future.result(timeout=10)
    with pytest.raises(RequestCancelledError):
        stream.submit(slow)


def test_an_error_in_the_with_block_cancels_the_stream(client):
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="stop"):
        with client.stream("identity", max_in_flight=4) as stream:
            for index, future in enumerate(stream.map(ONE for _ in range(10**6))):
                future.result()
                if index == 5:
                    raise RuntimeError("stop")
    assert time.monotonic() - started < 10
    assert client.server_live()


def test_stream_deadline_fails_pending_items(client):
    slow = {"ID": np.array([[3]], np.int64), "SLEEP_MS": np.array([[1500]], np.float32)}
    with client.stream("sleeper", timeout=0.3) as stream:
        future = stream.submit(slow)
        with pytest.raises(DeadlineExceededError):
            future.result(timeout=10)


# ------------------------------------------------------------------ asyncio


def test_async_client_has_the_same_surface(server):
    async def main() -> None:
        async with AsyncInferenceClient(server.address, timeout=20) as sdk:
            assert await sdk.server_live() and await sdk.server_ready()
            assert await sdk.model_ready("identity")
            assert (await sdk.server_metadata()).name == "tensorwire"
            assert (await sdk.model_metadata("identity")).inputs[0].name == "INPUT0"
            assert (await sdk.model_config("identity")).max_batch_size == 8
            assert (await sdk.model_statistics("identity")).model_stats[0].name == "identity"
            assert "identity" in {m.name for m in await sdk.repository_index()}
            await sdk.unload_model("spare")
            await sdk.load_model("spare")
            assert await sdk.model_ready("spare")

            results = await asyncio.gather(*(
                sdk.infer("identity", {"INPUT0": np.full((1, 16), i, np.float32)}, request_id=str(i))
                for i in range(50)
            ))
            assert [r["OUTPUT0"][0, 0] for r in results] == list(range(50))
            assert [r.id for r in results] == [str(i) for i in range(50)]
            for datatype in ("BYTES", "FP16", "INT8"):
                sent = sample(datatype, rows=1)
                out = (await sdk.infer(identity_name(datatype), {"INPUT0": sent}))["OUTPUT0"]
                assert out.shape == (1, 3)

            with pytest.raises(ModelNotFoundError):
                await sdk.infer("nope", ONE)
            with pytest.raises(InvalidInputError):
                await sdk.infer("identity", {"INPUT0": np.zeros((1, 15), np.float32)})
            slow = {"ID": np.array([[1]], np.int64), "SLEEP_MS": np.array([[1500]], np.float32)}
            with pytest.raises(DeadlineExceededError):
                await sdk.infer("sleeper", slow, timeout=0.3)

            async with sdk.stream("identity", max_in_flight=64) as stream:
                values = []
                async for future in stream.map(
                    {"INPUT0": np.full((1, 16), i, np.float32)} if i != 500 else {"INPUT0": np.zeros((1, 2))}
                    for i in range(1000)
                ):
                    try:
                        values.append(int(future.result()["OUTPUT0"][0, 0]))
                    except InvalidInputError:
                        values.append(-1)
            assert values == [i if i != 500 else -1 for i in range(1000)]

    asyncio.run(main())


def test_async_client_retries_and_closes(server):
    async def main() -> None:
        sdk = AsyncInferenceClient("127.0.0.1:1", retry=RetryPolicy(max_attempts=3, initial_backoff=0.01))
        with pytest.raises(InferenceServerError, match="failed to connect"):
            await sdk.server_live(timeout=5)
        assert sdk.retries == 2
        await sdk.close()
        with pytest.raises(InferenceServerError):
            await sdk.server_live()

    asyncio.run(main())
