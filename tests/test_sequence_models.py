"""Token sequences end to end: real text (pyjokes' jokes, a label<TAB>text file) tokenized by a BPE
tokenizer trained on the training split, a Transformer that masks padding, an ONNX export with dynamic
batch *and* sequence dimensions that works at lengths other than the example's, and INT64 serving."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from serving import running_server  # noqa: E402
from trained_runs import quick_run  # noqa: E402

from tensorwire.client import InferenceClient  # noqa: E402
from tensorwire.repository import load_model_config, write_model_config  # noqa: E402
from tensorwire.trainer.artifacts import load_trained, onnx_session, predict_onnx, predict_torch  # noqa: E402
from tensorwire.trainer.config import ExportOptions, PublishOptions  # noqa: E402
from tensorwire.trainer.data import DataSpec, load_splits  # noqa: E402
from tensorwire.trainer.errors import TrainerError  # noqa: E402
from tensorwire.trainer.export import export  # noqa: E402
from tensorwire.trainer.models import build_model  # noqa: E402
from tensorwire.trainer.publish import publish  # noqa: E402

SMALL = {"d_model": 32, "heads": 4, "layers": 1, "ff": 64}


def test_jokes_are_real_text_in_several_languages_tokenized_the_same_every_time():
    first = load_splits(DataSpec(data="jokes", max_length=24))
    second = load_splits(DataSpec(data="jokes", max_length=24))
    assert first.dtype == "int64" and first.train.x.dtype == np.int64 and first.sample_shape == (24,)
    assert {"en", "de", "pl", "it"} <= set(first.label_names) and first.num_classes == len(first.label_names)
    assert first.vocab_size == first.tokenizer.get_vocab_size() <= 1000
    np.testing.assert_array_equal(first.train.x, second.train.x)  # same tokenizer in every process
    np.testing.assert_array_equal(first.test.x, second.test.x)
    assert (first.train.x[:, 0] != 0).all()  # every sample has a first token
    assert (first.train.x == 0).any()  # shorter texts are right-padded with 0
    assert len(first.train) + len(first.val) + len(first.test) > 800


def test_a_labelled_text_file_trains_the_tokenizer_on_the_training_split_only(tmp_path):
    path = tmp_path / "reviews.tsv"
    good = [f"good great fine lovely film number {i}" for i in range(30)]
    bad = [f"bad awful poor boring film number {i}" for i in range(30)]
    path.write_text("".join(f"pos\t{t}\n" for t in good) + "".join(f"neg\t{t}\n" for t in bad), encoding="utf-8")
    splits = load_splits(DataSpec(data=str(path), vocab_size=60))
    assert splits.label_names == ("neg", "pos") and splits.num_classes == 2
    assert splits.vocab_size <= 60
    (tmp_path / "broken.txt").write_text("pos\tfine\nno tab here\n", encoding="utf-8")
    with pytest.raises(TrainerError, match="line 2 is not 'label<TAB>text'"):
        load_splits(DataSpec(data=str(tmp_path / "broken.txt")))


def test_integer_sequences_in_npz_are_token_data(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(120, 12))
    tokens[:, 8:] = 0
    np.savez(tmp_path / "seq.npz", tokens=tokens, y=np.arange(120) % 3)
    splits = load_splits(DataSpec(data=str(tmp_path / "seq.npz")))
    assert splits.dtype == "int64" and splits.vocab_size == int(tokens.max()) + 1 and splits.sample_shape == (12,)
    np.savez(tmp_path / "bad.npz", tokens=-tokens, y=np.arange(120) % 3)
    with pytest.raises(TrainerError, match="negative ids"):
        load_splits(DataSpec(data=str(tmp_path / "bad.npz")))


def test_padding_does_not_change_a_sequences_logits():
    torch.manual_seed(0)
    model = build_model("transformer", (16,), 5, {"vocab_size": 100, **SMALL}).eval()
    x = torch.randint(1, 100, (3, 7))
    padded = torch.cat([x, torch.zeros(3, 9, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(model(torch.zeros(2, 5, dtype=torch.int64))).all()  # all padding: no NaN


def test_mlp_and_cnn_refuse_token_data():
    from tensorwire.trainer.models import model_kwargs

    with pytest.raises(TrainerError, match="takes float features"):
        model_kwargs("cnn", {}, 100)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq")
    run = quick_run(root / "run", "jokes", "transformer", steps=15, max_length=32, model_args=SMALL)
    report = export(ExportOptions(run=str(run.root), formats=["onnx", "pt2"], verify_batch_sizes=[1, 7]))
    return run, report


def test_onnx_export_has_dynamic_batch_and_sequence_and_runs_at_other_lengths(exported):
    run, report = exported
    graph = onnx.load(str(run.onnx)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims[0].dim_param and dims[1].dim_param  # both named, dynamic
    # Verified at the training length and at others, each with random padding.
    assert {"1x32", "1x3", "1x17", "7x32", "7x3", "7x17"} == set(report["onnx"]["max_abs_diff"])
    model, _ = load_trained(run.best)
    session = onnx_session(run.onnx)
    rng = np.random.default_rng(3)
    for length in (2, 9, 48, 100):  # never seen at export, some longer than any training text
        x = rng.integers(1, 200, size=(4, length), dtype=np.int64)
        np.testing.assert_allclose(predict_onnx(session, x), predict_torch(model, x), atol=1e-4)
    assert (run.export_dir / "tokenizer.json").is_file()


def test_token_models_publish_and_serve_as_int64_of_any_length(exported, tmp_path):
    run, _ = exported
    repo = tmp_path / "models"
    for fmt in ("onnx", "pt2"):
        publish(PublishOptions(run=str(run.root), repo=str(repo)), fmt=fmt, name=f"jokes_{fmt}")
    config = load_model_config(repo / "jokes_onnx")
    assert [(s.name, s.datatype, s.dims) for s in config.inputs] == [("INPUT0", "INT64", [-1])]
    assert config.metadata["labels"].split(",")[:3] == ["cs", "de", "en"]
    model, _ = load_trained(run.best)
    rng = np.random.default_rng(5)
    with running_server(repo, "--drain-seconds", "0") as server, InferenceClient(server.address) as client:
        for name in ("jokes_onnx", "jokes_pt2"):
            for length in (4, 40):
                x = rng.integers(1, 200, size=(3, length), dtype=np.int64)
                x[0, length // 2 :] = 0
                got = client.infer(name, {"INPUT0": x})["OUTPUT0"]
                np.testing.assert_allclose(got, predict_torch(model, x), atol=1e-4)


def test_the_served_transformer_pads_requests_of_different_lengths_into_shared_batches(exported, tmp_path):
    """The published config declares INPUT0's 0-padding, so concurrent requests of different lengths share
    padded batches; each answer equals the eager model's on that request alone (within float tolerance)."""
    import asyncio

    from tensorwire.client import AsyncInferenceClient

    run, _ = exported
    repo = tmp_path / "models"
    publish(PublishOptions(run=str(run.root), repo=str(repo)), fmt="onnx", name="jokes")
    assert load_model_config(repo / "jokes").inputs[0].padding.pad_value == 0
    model, _ = load_trained(run.best)
    rng = np.random.default_rng(11)
    arrays = [rng.integers(1, 200, size=(1, int(n)), dtype=np.int64) for n in rng.integers(1, 60, size=32)]
    # The published delay (500 µs) is short; a longer one makes shared batches certain on a busy machine.
    config = load_model_config(repo / "jokes")
    batching = config.dynamic_batching.model_copy(update={"max_queue_delay_us": 200_000, "max_padded_share": 0.9})
    write_model_config(config.model_copy(update={"dynamic_batching": batching}), repo / "jokes")

    async def together(address):
        async with AsyncInferenceClient(address) as client:
            return await asyncio.gather(*(client.infer("jokes", {"INPUT0": x}) for x in arrays))

    with running_server(repo, "--drain-seconds", "0") as server, InferenceClient(server.address) as client:
        results = asyncio.run(together(server.address))
        stats = client.model_statistics("jokes").model_stats[0]
    for x, result in zip(arrays, results, strict=True):
        np.testing.assert_allclose(result["OUTPUT0"], predict_torch(model, x), atol=1e-4)
    assert stats.execution_count < stats.inference_count  # some requests of different lengths shared a run
