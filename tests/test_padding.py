"""Variable-length inputs that batch: padding declared in the config, bounded waste, each request's own
outputs back. Unit tests drive the real Executor and batcher with a fake backend (no network); one test
serves a real ONNX model through a real server (a mask built by the server, an output cut back to each
request's length, a pooled output returned whole)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from tensorwire.proto.codec import decode_raw
from tensorwire.repository import RepositoryConfigError, parse_model_config
from tensorwire.server.backends import Placement
from tensorwire.server.backends.base import TensorInfo
from tensorwire.server.batcher import DynamicBatcher, InferenceRequest, padding_of, shape_key
from tensorwire.server.errors import ModelLoadError
from tensorwire.server.replicas import Executor, Replica, WorkItem
from tensorwire.server.signature import resolve_signature
from tensorwire.server.stats import Metrics, ModelVersionStats

# ------------------------------------------------------------------ configuration


def config(**overrides):
    base = {
        "backend": "onnxruntime",
        "max_batch_size": 16,
        "inputs": [{"name": "TOKENS", "datatype": "INT64", "dims": [-1], "padding": {"value": 0}}],
    }
    return parse_model_config({**base, **overrides})


@pytest.mark.parametrize(
    ("inputs", "outputs", "extra", "message"),
    [
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1, -1], "padding": {}}],
            None,
            {},
            "field 'inputs.0.padding': dims [-1, -1] have 2 variable (-1) dimensions; say which one",
        ),
        (
            [{"name": "T", "datatype": "FP32", "dims": [-1, 4], "padding": {"axis": 1}}],
            None,
            {},
            "field 'inputs.0.padding.axis': 1 is not a variable (-1) dimension of dims [-1, 4]",
        ),
        (
            [{"name": "T", "datatype": "INT8", "dims": [-1], "padding": {"value": 200}}],
            None,
            {},
            "field 'inputs.0.padding.value': 200 is not a INT8",
        ),
        (
            [{"name": "T", "datatype": "FP32", "dims": [-1], "padding": {"value": float("nan")}}],
            None,
            {},
            "field 'inputs.0.padding.value': nan is not a finite number",
        ),
        (
            [{"name": "T", "datatype": "BYTES", "dims": [-1], "padding": {}}],
            None,
            {},
            "field 'inputs.0.padding': BYTES inputs cannot be padded",
        ),
        (
            [
                {"name": "T", "datatype": "INT64", "dims": [-1], "padding": {"mask": "M"}},
                {"name": "M", "datatype": "INT64", "dims": [-1]},
            ],
            None,
            {},
            "field 'inputs.0.padding.mask': 'M' is also listed in inputs",
        ),
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1], "padding": {"input": "T"}}],
            None,
            {},
            "field 'inputs.0.padding.input': is for outputs",
        ),
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1], "padding": {}}],
            [{"name": "Y", "datatype": "INT64", "dims": [-1], "padding": {"input": "X"}}],
            {},
            "field 'outputs.0.padding.input': 'X' is not a padded input; padded inputs: ['T']",
        ),
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1], "padding": {}}],
            [{"name": "Y", "datatype": "INT64", "dims": [-1], "padding": {"input": "T", "value": 1}}],
            {},
            "field 'outputs.0.padding': value and mask are for inputs",
        ),
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1], "padding": {}}],
            None,
            {"max_batch_size": 0},
            "field 'max_batch_size': 0 (no batch dimension), but inputs with padding need a batch dimension",
        ),
        (
            [{"name": "T", "datatype": "INT64", "dims": [-1], "padding": {"fill": 0}}],
            None,
            {},
            "field 'inputs.0.padding.fill': unknown key",
        ),
        (None, None, {"dynamic_batching": {"max_padded_share": 1.0}}, "field 'dynamic_batching.max_padded_share'"),
    ],
)
def test_padding_config_errors_name_the_field(inputs, outputs, extra, message):
    data = {"backend": "onnxruntime", "max_batch_size": 8, **extra}
    if inputs is not None:
        data["inputs"] = inputs
    if outputs is not None:
        data["outputs"] = outputs
    with pytest.raises(RepositoryConfigError) as err:
        parse_model_config(data)
    assert message in str(err.value)


def test_padding_config_defaults_and_round_trip():
    parsed = config(dynamic_batching={"max_padded_share": 0.1})
    spec = parsed.inputs[0]
    assert spec.padding.pad_value == 0 and spec.padded_axis == 0 and spec.padding.mask is None
    assert parsed.dynamic_batching.max_padded_share == 0.1
    assert parse_model_config(parsed.to_toml_dict()) == parsed
    assert config().dynamic_batching.max_padded_share == 0.25  # the default


def test_signature_refuses_an_untied_variable_output_and_an_unknown_mask():
    inputs = [TensorInfo("TOKENS", "INT64", (-1, -1))]
    with pytest.raises(ModelLoadError, match="output 'Y' has a variable dimension"):
        resolve_signature(config(), inputs, [TensorInfo("Y", "FP32", (-1, -1))])
    masked = config(
        inputs=[{"name": "TOKENS", "datatype": "INT64", "dims": [-1], "padding": {"mask": "attention_mask"}}]
    )
    with pytest.raises(ModelLoadError, match="padding.mask 'attention_mask' is not an input of the model file"):
        resolve_signature(masked, inputs, [TensorInfo("Y", "FP32", (-1, 2))])
    with_mask = [*inputs, TensorInfo("attention_mask", "INT64", (-1, -1))]
    signature = resolve_signature(masked, with_mask, [TensorInfo("Y", "FP32", (-1, 2))])
    assert [t.name for t in signature.inputs] == ["TOKENS"]  # clients never send the mask
    assert signature.padding.inputs[0].mask_datatype == "INT64"
    # A model with no batch dimension cannot pad.
    unbatched = config(max_batch_size=None)
    with pytest.raises(ModelLoadError, match="batch dimension"):
        resolve_signature(
            unbatched.model_copy(update={"max_batch_size": 0}), [TensorInfo("TOKENS", "INT64", (-1,))], []
        )


# ------------------------------------------------------------ executor and batcher

RAGGED_CONFIG = {
    "inputs": [{"name": "TOKENS", "datatype": "INT64", "dims": [-1], "padding": {"value": 0, "mask": "MASK"}}],
    "outputs": [
        {"name": "MEAN", "datatype": "FP64", "dims": [1]},
        {"name": "DOUBLED", "datatype": "INT64", "dims": [-1], "padding": {"input": "TOKENS"}},
    ],
}


def ragged_signature(max_padded_share: float = 0.25):
    parsed = config(**RAGGED_CONFIG, dynamic_batching={"max_padded_share": max_padded_share})
    return resolve_signature(
        parsed,
        [TensorInfo("TOKENS", "INT64", (-1, -1)), TensorInfo("MASK", "INT64", (-1, -1))],
        [TensorInfo("MEAN", "FP64", (-1, 1)), TensorInfo("DOUBLED", "INT64", (-1, -1))],
    )


class RaggedBackend:
    """MEAN: the mean of each row's tokens where the mask is 1 (the request's own positions, padding or
    not); DOUBLED: tokens * 2 per position. Records each batch's token array."""

    inputs = outputs = None
    device = "cpu"

    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.batches: list[np.ndarray] = []
        self.started: list[float] = []  # perf_counter when each batch began
        self.lock = threading.Lock()

    def run(self, inputs, output_names):
        tokens, mask = inputs["TOKENS"], inputs["MASK"]
        assert mask.shape == tokens.shape and mask.dtype == np.int64
        with self.lock:
            self.batches.append(tokens.copy())
            self.started.append(time.perf_counter())
        if self.sleep:
            time.sleep(self.sleep)
        mean = (tokens * mask).sum(axis=1, keepdims=True) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        return {"MEAN": mean.astype(np.float64), "DOUBLED": tokens * 2}

    def close(self):
        pass


def tokens(rows: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, size=(rows, length), dtype=np.int64)


def decode(result) -> dict[str, np.ndarray]:
    return {name: decode_raw(raw, datatype, shape) for name, datatype, shape, raw in result}


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"MEAN": x.mean(axis=1, keepdims=True), "DOUBLED": x * 2}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 40)), min_size=1, max_size=12))
def test_a_padded_batch_gives_each_request_what_it_gets_alone(specs):
    """Property: for any mix of rows and lengths, the padded batch's answer to each request equals the
    answer it gets when run alone (exactly: the fake model is exact)."""
    executor = Executor(RaggedBackend(), ragged_signature(), "ragged:1")
    items = [
        WorkItem({"TOKENS": tokens(rows, length, i)}, rows, ["MEAN", "DOUBLED"])
        for i, (rows, length) in enumerate(specs)
    ]
    together = executor.execute(items).results
    for item, batched in zip(items, together, strict=True):
        alone = executor.execute([item]).results[0]
        got, want = decode(batched), decode(alone)
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want[name])
        if item.inputs["TOKENS"].shape[1]:
            np.testing.assert_array_equal(got["DOUBLED"], expected(item.inputs["TOKENS"])["DOUBLED"])
    lengths = {length for _, length in specs}
    shapes = [batch.shape for batch in executor.backend.batches[: 1 if len(items) > 1 else 0]]
    assert all(shape == (sum(r for r, _ in specs), max(lengths)) for shape in shapes)  # one padded batch


def make_request(ident: int, rows: int, length: int) -> InferenceRequest:
    inputs = {"TOKENS": tokens(rows, length, ident)}
    return InferenceRequest(inputs, rows, ["MEAN", "DOUBLED"], str(ident), shape_key=shape_key(inputs, True))


def make_batcher(backend, loop, signature, **settings) -> DynamicBatcher:
    from tensorwire.repository import DynamicBatching

    replica = Replica(0, Executor(backend, signature, "ragged:1"), Placement(), loop)
    stats = ModelVersionStats(Metrics(gpu=False), "ragged", 1)
    return DynamicBatcher("ragged:1", 16, DynamicBatching(**settings), [replica], stats, loop)


def share(batch: np.ndarray) -> float:
    return float((batch == 0).sum() / batch.size)  # tokens are never 0: zeros are padding


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(1, 3), st.integers(1, 64)), min_size=2, max_size=40),
    st.sampled_from([0.0, 0.1, 0.25, 0.5]),
)
def test_batches_of_different_lengths_form_within_the_padded_share(specs, max_share):
    """Property: under load, requests of different lengths share batches; no batch pads more than the
    configured share of its elements; every request gets exactly its own outputs; the padding counters
    add up to what the model saw."""

    async def scenario():
        backend = RaggedBackend(sleep=0.002)
        signature = ragged_signature(max_share)
        batcher = make_batcher(backend, asyncio.get_running_loop(), signature)
        requests_ = [make_request(i, rows, length) for i, (rows, length) in enumerate(specs)]
        results = await asyncio.gather(*(batcher.submit(r) for r in requests_))
        return backend, batcher, requests_, results

    backend, batcher, requests_, results = asyncio.run(scenario())
    for request, result in zip(requests_, results, strict=True):
        got = decode(result)
        want = expected(request.inputs["TOKENS"])
        np.testing.assert_allclose(got["MEAN"], want["MEAN"], rtol=1e-12)
        np.testing.assert_array_equal(got["DOUBLED"], want["DOUBLED"])
    for batch in backend.batches:
        assert share(batch) <= max_share + 1e-9
        assert batch.shape[0] <= 16
    counters = batcher.stats.counters
    assert counters.pads
    assert counters.padding_elements == sum(int((b == 0).sum()) for b in backend.batches)
    assert counters.padded_input_elements == sum(b.size for b in backend.batches)
    assert sum(b.shape[0] for b in backend.batches) == sum(r.rows for r in requests_)


def test_one_long_request_does_not_inflate_the_short_ones():
    """63 short requests and one long one, all queued behind a busy replica: the short ones batch
    together, the long one goes on its own (its padding share would be far above the limit)."""

    async def scenario():
        backend = RaggedBackend(sleep=0.05)
        batcher = make_batcher(backend, asyncio.get_running_loop(), ragged_signature(0.25))
        first = batcher.submit(make_request(100, 1, 8))
        await asyncio.sleep(0.01)  # the replica is busy: the rest queue
        lengths = [8 + i % 3 for i in range(31)] + [128] + [8 + i % 3 for i in range(32)]
        queued = [make_request(i, 1, length) for i, length in enumerate(lengths)]
        await asyncio.gather(first, *(batcher.submit(r) for r in queued))
        return backend

    backend = asyncio.run(scenario())
    long_batches = [b for b in backend.batches if b.shape[1] == 128]
    assert len(long_batches) == 1 and long_batches[0].shape[0] == 1
    short = [b for b in backend.batches if b.shape[1] < 128]
    assert max(b.shape[0] for b in short) == 16  # full batches of short requests
    assert all(share(b) <= 0.25 for b in backend.batches)


def test_equal_lengths_with_share_zero_batch_as_before_and_the_oldest_always_goes():
    async def scenario():
        backend = RaggedBackend(sleep=0.03)
        batcher = make_batcher(backend, asyncio.get_running_loop(), ragged_signature(0.0))
        first = batcher.submit(make_request(100, 1, 5))
        await asyncio.sleep(0.01)
        queued = [make_request(i, 1, 5 if i % 2 else 7) for i in range(12)]
        await asyncio.gather(first, *(batcher.submit(r) for r in queued))
        return backend

    backend = asyncio.run(scenario())
    assert [b.shape for b in backend.batches] == [(1, 5), (6, 7), (6, 5)]  # oldest first: length 7's lane
    assert all(share(b) == 0 for b in backend.batches)


def test_padding_of_counts_elements():
    requests_ = [make_request(i, rows, length) for i, (rows, length) in enumerate([(1, 4), (2, 6), (1, 2)])]
    for request in requests_:
        request.padded = ((request.inputs["TOKENS"].shape[1], 1),)
    assert padding_of(requests_) == (4 * 6 - (4 + 12 + 2), 4 * 6)


# ------------------------------------------------------------------ a real server


def ragged_onnx(repo: Path, name: str = "ragged", **dynamic_batching) -> Path:
    """MEAN = masked mean of TOKENS (FP32 [batch, 1]); LENGTH = the mask's sum; DOUBLED = TOKENS * 2
    ([batch, len], follows TOKENS). ``attention_mask`` is built by the server."""
    import onnx
    import tomli_w

    nodes = [
        helper.make_node("Cast", ["TOKENS"], ["tf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["tf", "mf"], ["kept"]),
        helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
        helper.make_node("ReduceSum", ["kept", "axes"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["mf", "axes"], ["LENGTH"], keepdims=1),
        helper.make_node("Div", ["total", "LENGTH"], ["MEAN"]),
        helper.make_node("Add", ["TOKENS", "TOKENS"], ["DOUBLED"]),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info("TOKENS", TensorProto.INT64, ["batch", "len"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "len"]),
        ],
        [
            helper.make_tensor_value_info("MEAN", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("LENGTH", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("DOUBLED", TensorProto.INT64, ["batch", "len"]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    cfg = {
        "backend": "onnxruntime",
        "max_batch_size": 16,
        "inputs": [
            {"name": "TOKENS", "datatype": "INT64", "dims": [-1], "padding": {"value": 0, "mask": "attention_mask"}}
        ],
        "outputs": [
            {"name": "MEAN", "datatype": "FP32", "dims": [1]},
            {"name": "LENGTH", "datatype": "FP32", "dims": [1]},
            {"name": "DOUBLED", "datatype": "INT64", "dims": [-1], "padding": {"input": "TOKENS"}},
        ],
        "dynamic_batching": {"max_queue_delay_us": 2000, **dynamic_batching},
    }
    (repo / name / "config.toml").write_text(tomli_w.dumps(cfg))
    return path


def scrape(server) -> dict[str, float]:
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == "ragged" and not sample.name.endswith("_created"):
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


@pytest.fixture(scope="module")
def ragged_server(tmp_path_factory):
    from serving import running_server

    repo = tmp_path_factory.mktemp("ragged") / "models"
    ragged_onnx(repo, max_padded_share=0.5)
    with running_server(repo, "--drain-seconds", "0") as server:
        yield server


def test_the_mask_is_hidden_from_clients(ragged_server):
    from tensorwire.client import InferenceClient

    with InferenceClient(ragged_server.address) as client:
        metadata = client.model_metadata("ragged")
    assert [t.name for t in metadata.inputs] == ["TOKENS"]
    assert [t.name for t in metadata.outputs] == ["MEAN", "LENGTH", "DOUBLED"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 2), st.integers(1, 48)), min_size=8, max_size=24))
def test_a_real_server_pads_batches_and_answers_each_request_as_if_alone(ragged_server, specs):
    """Property, through a real server (gRPC, ONNX Runtime): requests of random lengths sent together
    get the same answers as each sent alone, within float32 tolerance; some of them shared a batch."""
    from tensorwire.client import AsyncInferenceClient

    arrays = [tokens(rows, length, i) for i, (rows, length) in enumerate(specs)]

    async def scenario():
        async with AsyncInferenceClient(ragged_server.address) as client:
            alone = [await client.infer("ragged", {"TOKENS": x}) for x in arrays]
            together = await asyncio.gather(*(client.infer("ragged", {"TOKENS": x}) for x in arrays))
            return alone, together

    before = scrape(ragged_server)
    alone, together = asyncio.run(scenario())
    after = scrape(ragged_server)
    for x, one, many in zip(arrays, alone, together, strict=True):
        np.testing.assert_array_equal(many["DOUBLED"], x * 2)
        np.testing.assert_array_equal(many["LENGTH"], np.full((x.shape[0], 1), x.shape[1], np.float32))
        np.testing.assert_allclose(many["MEAN"], x.mean(axis=1, keepdims=True), rtol=1e-5)
        np.testing.assert_allclose(many["MEAN"], one["MEAN"], rtol=1e-6)
    requests_sent = 2 * len(arrays)
    executions = after["tensorwire_execution_count_total"] - before.get("tensorwire_execution_count_total", 0)
    assert executions <= requests_sent
    padded = after["tensorwire_padded_input_elements_total"] - before.get("tensorwire_padded_input_elements_total", 0)
    padding = after["tensorwire_padding_elements_total"] - before.get("tensorwire_padding_elements_total", 0)
    assert padded >= sum(x.size for x in arrays) * 2 and 0 <= padding <= 0.5 * padded


def test_a_real_server_forms_padded_batches_under_load(ragged_server):
    """Concurrent requests of distinct lengths share executions (average batch above 1) with padding
    counted; repeated rounds make this robust on a busy machine."""
    from tensorwire.client import AsyncInferenceClient

    before = scrape(ragged_server)

    async def round_(client, seed):
        arrays = [tokens(1, 10 + (i % 8), seed * 100 + i) for i in range(32)]
        results = await asyncio.gather(*(client.infer("ragged", {"TOKENS": x}) for x in arrays))
        for x, result in zip(arrays, results, strict=True):
            np.testing.assert_array_equal(result["DOUBLED"], x * 2)

    async def scenario():
        async with AsyncInferenceClient(ragged_server.address) as client:
            for seed in range(10):
                await round_(client, seed)
                now = scrape(ragged_server)
                if now.get("tensorwire_padding_elements_total", 0) > before.get("tensorwire_padding_elements_total", 0):
                    return now
            return scrape(ragged_server)

    after = asyncio.run(scenario())
    executions = after["tensorwire_execution_count_total"] - before.get("tensorwire_execution_count_total", 0)
    inferences = after["tensorwire_inference_count_total"] - before.get("tensorwire_inference_count_total", 0)
    assert inferences / executions > 1
    assert after["tensorwire_padding_elements_total"] > before.get("tensorwire_padding_elements_total", 0)


def test_requests_the_padding_bound_keeps_out_do_not_make_the_replica_wait():
    """A backlog of lengths that cannot share a batch: the batch of short ones goes as soon as the replica is
    free, without waiting max_queue_delay_us for companions, since the long ones queued cannot join it (the
    last batch, with nothing else queued, may wait: Triton's rule, as for any model)."""

    async def scenario():
        backend = RaggedBackend(sleep=0.05)
        batcher = make_batcher(
            backend,
            asyncio.get_running_loop(),
            ragged_signature(0.1),
            max_queue_delay_us=2_000_000,
            preferred_batch_sizes=[16],
        )
        first = batcher.submit(make_request(100, 1, 8))
        await asyncio.sleep(0.01)
        queued = [make_request(i, 1, 128 if i % 2 else 8) for i in range(6)]
        await asyncio.gather(first, *(batcher.submit(r) for r in queued))
        return backend

    backend = asyncio.run(scenario())
    shapes = [b.shape for b in backend.batches]
    assert shapes == [(1, 8), (3, 8), (3, 128)]  # the oldest (length 8) first, its equals with it
    assert backend.started[1] - backend.started[0] < 1.0  # right after the batch before it: no 2 s wait


def test_the_variable_length_scenario_serves_one_file_with_padding_on_and_off(tmp_path):
    """The benchmark scenario's repository (the model is trained there once; here a stand-in with the same
    layout) and its section, from made-up numbers."""
    from tensorwire.loadtest import variable_length
    from tensorwire.loadtest.harness import Context, Page
    from tensorwire.repository import load_model_config

    ctx = Context(workdir=tmp_path / "work")
    source = ctx.store / variable_length.MODEL
    ragged_onnx(source.parent, variable_length.MODEL)
    (source / variable_length.TOKENIZER).write_text('{"model": {"vocab": {"[PAD]": 0, "a": 1, "b": 2}}}')
    repo = variable_length.make_repo(ctx, source)
    padded = load_model_config(repo / variable_length.PADDED)
    unpadded = load_model_config(repo / variable_length.UNPADDED)
    assert padded.inputs[0].padding is not None and unpadded.inputs[0].padding is None
    assert all(spec.padding is None for spec in unpadded.outputs)
    assert (repo / variable_length.UNPADDED / "1" / "model.onnx").is_file()
    assert not (repo / variable_length.PADDED / variable_length.TOKENIZER).exists()
    assert variable_length._vocabulary(source) == 3
    import onnx

    graph = helper.make_graph(
        [helper.make_node("Cast", ["INPUT0"], ["OUTPUT0"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT64, ["batch", "len"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", "len"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "cast.onnx"))
    cost = variable_length.in_process_cost(tmp_path / "cast.onnx", 3, lengths=(4,))
    assert cost[0]["length"] == 4 and cost[0]["batch1_ms_per_sequence"] > 0
    rows = [
        {"padding": "on", "concurrency": 64, "throughput_rps": 900.0, "latency_p99_ms": 80.0, "padded_share": 0.2},
        {"padding": "off", "concurrency": 64, "throughput_rps": 600.0, "latency_p99_ms": 90.0, "padded_share": None},
    ]
    result = {"rows": rows, "in_process": cost, "lengths": [8, 128], "recipe": "--data jokes", "window_s": 30}
    text = variable_length.render(result, Page(tmp_path / "B.md"))
    assert "| on | 64 | 900 |" in text and "20.0%" in text and "1.50× the throughput" in text
