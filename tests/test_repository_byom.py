"""Bring your own model, the repository side: backends inferred from files, folders without a
configuration, ``max_batch_size`` completed from shapes, and Triton's ``config.pbtxt`` read into our
configuration (every setting honoured, refused with a reason, or listed as ignored).

These read real folders and real text; what the server does with the result is in test_byom_serving.py
and test_triton_repository.py.
"""

from __future__ import annotations

import textwrap
import zipfile
from pathlib import Path

import pytest
from byom_models import densenet_pbtxt

from tensorwire.repository import (
    BACKENDS,
    DEFAULT_MAX_BATCH_SIZE,
    BackendFormat,
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    RepositoryConfigError,
    TensorSpec,
    VersionPolicy,
    complete_max_batch_size,
    infer_backend,
    is_model_folder,
    list_models,
    load_model_config,
    parse_model_config,
    parse_triton_config,
    read_model_config,
    write_model_config,
)
from tensorwire.repository.backends import BackendInferenceError


def touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ backend from the model file


@pytest.mark.parametrize(
    ("filename", "backend"), [("model.onnx", "onnxruntime"), ("model.pt", "torchscript"), ("model.py", "python")]
)
def test_backend_follows_from_the_file(tmp_path, filename, backend):
    touch(tmp_path / "m" / "1" / filename)
    assert infer_backend(tmp_path / "m", [1]) == (backend, f"1/{filename}")


def test_backend_from_default_model_filename_extension(tmp_path):
    assert infer_backend(tmp_path, [], "resnet50.onnx") == ("onnxruntime", "default_model_filename resnet50.onnx")
    assert infer_backend(tmp_path, [], "traced.pt")[0] == "torchscript"
    with pytest.raises(BackendInferenceError, match=r"'weights.bin'.*\.onnx \(onnxruntime\)"):
        infer_backend(tmp_path, [], "weights.bin")


def test_backend_inference_refusals_say_why(tmp_path):
    model = tmp_path / "m"
    touch(model / "1" / "model.onnx")
    touch(model / "1" / "model.pt")
    with pytest.raises(BackendInferenceError, match=r"1/model.onnx, 1/model.pt: cannot tell which"):
        infer_backend(model, [1])
    touch(model / "2" / "notes.txt")
    none_of = "version folder 2 holds none of model.onnx, model.pt, model.pt2, model.py"
    with pytest.raises(BackendInferenceError, match=none_of):
        infer_backend(model, [2])
    touch(model / "3" / "model.plan")
    with pytest.raises(BackendInferenceError, match=r"3/model.plan \(a TensorRT plan\) cannot be served"):
        infer_backend(model, [3])
    touch(model / "4" / "model.onnx")
    touch(model / "5" / "model.pt")
    with pytest.raises(BackendInferenceError, match=r"different model kinds \(4/model.onnx, 5/model.pt\)"):
        infer_backend(model, [4, 5])
    with pytest.raises(BackendInferenceError, match="no version folder"):
        infer_backend(model, [])


def test_a_new_backend_is_one_table_entry(tmp_path, monkeypatch):
    """The table other backends extend: inference follows from one entry."""
    monkeypatch.setitem(BACKENDS, "example", BackendFormat("example", "model.example", "example"))
    touch(tmp_path / "m" / "1" / "model.example")
    assert infer_backend(tmp_path / "m", [1]) == ("example", "1/model.example")
    assert infer_backend(tmp_path, [], "program.example")[0] == "example"


def test_pt2_files_are_told_apart_by_their_contents(tmp_path):
    """torch.export programs and AOTInductor packages are both model.pt2 zip archives; a package holds
    compiled code under <archive>/data/aotinductor/ (the layout torch 2.13 writes)."""
    program, package = tmp_path / "te" / "1" / "model.pt2", tmp_path / "ao" / "1" / "model.pt2"
    for path, member in ((program, "te/models/model.json"), (package, "ao/data/aotinductor/model/x.wrapper.so")):
        path.parent.mkdir(parents=True)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr(member, b"{}")
    assert infer_backend(tmp_path / "te", [1]) == ("torch_export", "1/model.pt2")
    assert infer_backend(tmp_path / "ao", [1]) == ("aotinductor", "1/model.pt2")
    assert infer_backend(tmp_path / "ao", [1], "model.pt2")[0] == "aotinductor"


# ------------------------------------------------------------------ model folders and their configuration


def test_a_model_folder_needs_no_configuration(tmp_path):
    touch(tmp_path / "bert" / "1" / "model.onnx")
    source = read_model_config(tmp_path / "bert")
    assert source.path is None and source.source == "(none)"
    assert source.config.backend == "onnxruntime"
    assert source.config.max_batch_size is None  # completed from the model's shapes at load
    assert source.inferred == {"backend": "onnxruntime (from 1/model.onnx)"}
    assert source.config.model_filename == "model.onnx" and source.config.platform == "onnxruntime_onnx"


def test_config_toml_with_only_max_batch_size(tmp_path):
    touch(tmp_path / "bert" / "config.toml", "max_batch_size = 16\n")
    touch(tmp_path / "bert" / "3" / "model.onnx")
    source = read_model_config(tmp_path / "bert")
    assert (source.config.backend, source.config.max_batch_size) == ("onnxruntime", 16)
    assert source.inferred == {"backend": "onnxruntime (from 3/model.onnx)"}
    assert source.source == "config.toml"
    assert load_model_config(tmp_path / "bert") == source.config


def test_inference_looks_only_at_the_versions_to_serve(tmp_path):
    touch(tmp_path / "m" / "config.toml", "version_policy = { specific = [2] }\n")
    touch(tmp_path / "m" / "1" / "model.pt")  # not served: does not count
    touch(tmp_path / "m" / "2" / "model.onnx")
    assert load_model_config(tmp_path / "m").backend == "onnxruntime"


def test_an_explicit_backend_is_never_second_guessed(tmp_path):
    touch(tmp_path / "m" / "config.toml", 'backend = "python"\n')
    touch(tmp_path / "m" / "1" / "model.onnx")
    source = read_model_config(tmp_path / "m")
    assert source.config.backend == "python" and source.inferred == {}


def test_both_configuration_files_is_an_error(tmp_path):
    touch(tmp_path / "m" / "config.toml", "max_batch_size = 4\n")
    touch(tmp_path / "m" / "config.pbtxt", "max_batch_size: 4\n")
    touch(tmp_path / "m" / "1" / "model.onnx")
    with pytest.raises(RepositoryConfigError, match="holds both config.toml and config.pbtxt; keep one") as info:
        read_model_config(tmp_path / "m")
    assert str(tmp_path / "m") in str(info.value)


def test_uninferable_backend_names_the_folder(tmp_path):
    touch(tmp_path / "m" / "config.toml", "max_batch_size = 4\n")
    touch(tmp_path / "m" / "1" / "weights.bin")
    with pytest.raises(RepositoryConfigError, match="config.toml: version folder 1 holds none of") as info:
        read_model_config(tmp_path / "m")
    assert str(tmp_path / "m" / "config.toml") in str(info.value)


def test_which_folders_are_models(tmp_path):
    touch(tmp_path / "toml_only" / "config.toml", 'backend = "onnxruntime"\n')
    touch(tmp_path / "pbtxt_only" / "config.pbtxt", "")
    touch(tmp_path / "bare" / "1" / "model.onnx")
    (tmp_path / "empty").mkdir()
    touch(tmp_path / "notes" / "readme.txt")
    touch(tmp_path / "not_versions" / "01" / "model.onnx")  # leading zero: not a version folder
    touch(tmp_path / ".hidden" / "1" / "model.onnx")
    touch(tmp_path / "stray.onnx")
    assert list_models(tmp_path) == ["bare", "pbtxt_only", "toml_only"]
    assert is_model_folder(tmp_path / "bare") and not is_model_folder(tmp_path / "absent")


# ------------------------------------------------------------------ reshape in config.toml


def test_reshape_is_validated_and_round_trips(tmp_path):
    config = parse_model_config(
        {
            "max_batch_size": 8,
            "inputs": [{"name": "x", "datatype": "FP32", "dims": [1], "reshape": []}],
            "outputs": [{"name": "y", "datatype": "FP32", "dims": [2, 3], "reshape": [6]}],
        }
    )
    assert config.inputs[0].model_dims == [] and config.outputs[0].model_dims == [6]
    assert config.tensor_spec("y").reshape == [6] and config.tensor_spec("z") is None
    write_model_config(config.model_copy(update={"backend": "onnxruntime"}), tmp_path / "m")
    assert load_model_config(tmp_path / "m").inputs == config.inputs


@pytest.mark.parametrize(
    ("dims", "reshape", "hint"),
    [
        ([4], [3], "holds 3 elements, dims [4] hold 4"),
        ([-1, 4], [4, -1], "has a variable (-1) dimension"),
        ([2], [0, 2], "contain 0"),
    ],
)
def test_impossible_reshape_is_refused(dims, reshape, hint):
    with pytest.raises(RepositoryConfigError, match=r"field 'inputs\.0(\.reshape)?'") as info:
        parse_model_config({"inputs": [{"name": "x", "datatype": "FP32", "dims": dims, "reshape": reshape}]})
    assert hint in str(info.value)


# ------------------------------------------------------------------ max_batch_size completed from shapes


class T:
    """A model tensor as a backend reports it (name, full shape)."""

    def __init__(self, name: str, *shape: int) -> None:
        self.name, self.shape = name, tuple(shape)


def test_variable_leading_dimensions_everywhere_batch():
    config = ModelConfigFile(backend="onnxruntime")
    decision = complete_max_batch_size(
        config, [T("input_ids", -1, -1), T("attention_mask", -1, -1)], [T("logits", -1, 2)]
    )
    assert decision.max_batch_size == DEFAULT_MAX_BATCH_SIZE == 16 and decision.batched
    assert decision.reason == "every input and output has a variable leading dimension"
    bigger = ModelConfigFile(backend="onnxruntime", dynamic_batching=DynamicBatching(preferred_batch_sizes=[32]))
    assert complete_max_batch_size(bigger, [T("x", -1, 4)], [T("y", -1)]).max_batch_size == 32


def test_silero_vad_shapes_do_not_batch():
    """silero_vad.onnx: input [?, ?], state [2, ?, 128], sr [] -> output [?, 1], stateN [?, ?, ?]."""
    decision = complete_max_batch_size(
        ModelConfigFile(backend="onnxruntime"),
        [T("input", -1, -1), T("state", 2, -1, 128), T("sr")],
        [T("output", -1, 1), T("stateN", -1, -1, -1)],
    )
    assert decision.max_batch_size == 0 and not decision.batched
    assert decision.reason == (
        "no batch dimension: input 'state' has a fixed leading dimension 2; input 'sr' has no dimensions"
    )


def test_no_shapes_in_the_file_means_no_batch_dimension():
    decision = complete_max_batch_size(ModelConfigFile(backend="torchscript"), None, None)
    assert decision.max_batch_size == 0 and "set max_batch_size" in decision.reason


def test_config_tensors_of_full_rank_mean_no_batch_dimension():
    config = parse_model_config(
        {"backend": "onnxruntime", "inputs": [{"name": "x", "datatype": "FP32", "dims": [-1, 4]}]}
    )
    decision = complete_max_batch_size(config, [T("x", -1, 4)], [T("y", -1)])
    assert decision.max_batch_size == 0 and "gives input 'x' 2 dims for a model tensor of rank 2" in decision.reason
    with pytest.raises(ValueError, match="given"):
        complete_max_batch_size(ModelConfigFile(backend="onnxruntime", max_batch_size=0), [], [])


# ------------------------------------------------------------------ Triton's config.pbtxt

#: Triton quickstart's densenet_onnx configuration (shape of the real one: fixed batch of 1 through reshape).
DENSENET = densenet_pbtxt(3, 224, 1000)

#: Every setting the reader honours, in Triton's own spellings (lists with and without colons, <> blocks).
SIMPLE = """\
# comments are fine
name: "simple"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { specific { versions: [1, 3] } }
default_model_filename: "add_sub.onnx"
input [
  { name: "INPUT0", data_type: TYPE_INT32, dims: [ 16 ] },
  { name: "INPUT1"; data_type: TYPE_INT32; dims: 16 }
]
output: [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 16 ] },
          { name: "OUTPUT1" data_type: TYPE_STRING dims: [ -1 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 250
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { default_timeout_microseconds: 5000 max_queue_size: 64 allow_timeout_override: true }
}
instance_group [
  { count: 2 kind: KIND_CPU },
  < kind: KIND_GPU gpus: [ 0, 1 ] >
]
parameters { key: "labels" value: { string_value: "cat,dog" } }
parameters [ { key: "accuracy" value { string_value: "0.91" } } ]
model_transaction_policy { decoupled: false }
"""


def test_triton_densenet_quickstart_config():
    triton = parse_triton_config(DENSENET, "densenet_onnx")
    config = triton.config
    assert (config.backend, config.max_batch_size) == ("onnxruntime", 0)
    assert config.inputs == [TensorSpec(name="data_0", datatype="FP32", dims=[3, 224, 224], reshape=[1, 3, 224, 224])]
    assert config.outputs == [TensorSpec(name="fc6_1", datatype="FP32", dims=[1000], reshape=[1, 1000, 1, 1])]
    assert triton.ignored == [
        "input[data_0].format: not supported (ignored)",
        "output[fc6_1].label_filename: not supported (ignored)",
    ]


def test_triton_config_every_honoured_setting():
    triton = parse_triton_config(SIMPLE, "simple")
    config = triton.config
    assert triton.ignored == []
    assert config.backend == "onnxruntime" and config.max_batch_size == 8
    assert config.version_policy == VersionPolicy(specific=[1, 3])
    assert config.model_filename == "add_sub.onnx"
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [
        ("INPUT0", "INT32", [16]),
        ("INPUT1", "INT32", [16]),
    ]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [
        ("OUTPUT0", "INT32", [16]),
        ("OUTPUT1", "BYTES", [-1]),
    ]
    assert config.dynamic_batching == DynamicBatching(
        max_queue_delay_us=250,
        preferred_batch_sizes=[4, 8],
        priority_levels=2,
        default_priority_level=2,
        default_timeout_us=5000,
        max_queue_size=64,
    )
    assert config.instance_group == [InstanceGroup(kind="cpu", count=2), InstanceGroup(kind="gpu", gpus=[0, 1])]
    assert config.metadata == {"accuracy": "0.91", "labels": "cat,dog"}


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("", VersionPolicy(latest=1)),
        ("version_policy: { all { }}", VersionPolicy(all=True)),
        ("version_policy: { latest: { num_versions: 2}}", VersionPolicy(latest=2)),
        ("version_policy: { specific: { versions: [1,3]}}", VersionPolicy(specific=[1, 3])),
    ],
)
def test_triton_version_policies(text, policy):
    assert parse_triton_config(text, "m").config.version_policy == policy


def test_triton_defaults_where_protobuf_zero_means_something_else():
    """No max_batch_size: completed at load; no scheduler: the dynamic batcher on without delay; count 0:
    one instance; priority_levels 0: no priorities; an explicit max_batch_size 0 stays 0."""
    config = parse_triton_config('platform: "pytorch_libtorch"\ninstance_group [{ kind: KIND_AUTO }]', "m").config
    assert config.backend == "torchscript" and config.max_batch_size is None
    assert config.dynamic_batching == DynamicBatching(max_queue_delay_us=0)
    assert config.instance_group == [InstanceGroup(kind="auto", count=1)]
    assert parse_triton_config("max_batch_size: 0", "m").config.max_batch_size == 0
    batching = parse_triton_config("max_batch_size: 4\ndynamic_batching { }", "m").config.dynamic_batching
    assert batching == DynamicBatching(max_queue_delay_us=0, priority_levels=1)


def test_triton_settings_we_do_not_honour_are_listed():
    triton = parse_triton_config(
        """
        max_batch_size: 4
        input [{ name: "x" data_type: TYPE_FP32 dims: [1] optional: true is_shape_tensor: false }]
        instance_group [{ name: "g" kind: KIND_MODEL rate_limiter { resources [{ name: "R1" count: 4 }] } }]
        optimization { execution_accelerators { gpu_execution_accelerator: [{ name: "tensorrt" }] } }
        dynamic_batching {
          preserve_ordering: true
          priority_queue_policy { key: 1 value { max_queue_size: 3 } }
          default_queue_policy { timeout_action: DELAY max_queue_size: 0 allow_timeout_override: false }
        }
        model_warmup [{
          name: "zeros" batch_size: 1 inputs { key: "x" value { data_type: TYPE_FP32 dims: [1] zero_data: true } }
        }]
        response_cache { enable: true }
        """,
        "m",
    )
    assert triton.ignored == [
        "input[x].optional: not supported (ignored)",
        "instance_group[0].rate_limiter: not supported (ignored)",
        "optimization: not supported (ignored)",
        "dynamic_batching.priority_queue_policy: not supported (ignored)",
        "model_warmup: not supported (ignored)",
        "response_cache: not supported (ignored)",
        "dynamic_batching.preserve_ordering: responses of one stream keep their order; unary calls have no order "
        "to keep (ignored)",
        "dynamic_batching.default_queue_policy.max_queue_size: 0 (unbounded) is not offered; the queue is bounded "
        "at the default 1024 (ignored)",
        "dynamic_batching.default_queue_policy.timeout_action: DELAY is not offered; timed-out requests are "
        "rejected (ignored)",
        "dynamic_batching.default_queue_policy.allow_timeout_override: false is not offered; a request's own "
        "timeout is always honoured (ignored)",
        "instance_group[0].kind: KIND_MODEL is served as KIND_AUTO (ignored)",
        "instance_group[0].name: replicas are named <model>_<index> (ignored)",
    ]
    assert triton.config.instance_group == [InstanceGroup(kind="auto")]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            'platform: "ensemble"\nensemble_scheduling { step [ { model_name: "a" model_version: -1 } ] }',
            "ensemble_scheduling: ensemble scheduling (a pipeline of other models)",
        ),
        ('platform: "ensemble"', "platform 'ensemble' is an ensemble"),
        (
            'ensemble_scheduling { step [ { model_name: "a" input_map { key: "A" value: "B" } } ] }',
            "ensemble_scheduling: ensemble scheduling",
        ),
        (
            'platform: "tensorrt_plan"',
            "platform 'tensorrt_plan' is a TensorRT plan; tensorwire serves onnxruntime_onnx",
        ),
        ('backend: "tensorflow"', "backend 'tensorflow' is a TensorFlow model"),
        ('backend: "python"', "backend 'python' is a Triton Python model"),
        ('backend: "fil"', "backend 'fil' is a model kind tensorwire has no backend for"),
        ('platform: "onnxruntime_onnx"\nbackend: "pytorch"', "name different backends"),
        ("sequence_batching { max_sequence_idle_microseconds: 5000000 }", "sequence_batching: sequence batching"),
        (
            'batch_input [{ kind: BATCH_ACCUMULATED_ELEMENT_COUNT target_name: "INDEX" data_type: TYPE_FP32 }]',
            "batch_input: batch inputs built by the server",
        ),
        (
            'input [{ name: "x" data_type: TYPE_FP32 dims: [-1] allow_ragged_batch: true }]',
            "input[x].allow_ragged_batch: ragged batching",
        ),
        (
            'output [{ name: "y" data_type: TYPE_INT32 dims: [2] is_shape_tensor: true }]',
            "output[y].is_shape_tensor: shape tensors",
        ),
        ("model_transaction_policy { decoupled: True }", "model_transaction_policy.decoupled: decoupled responses"),
        ('name: "other"', "name 'other' differs from the model's folder 'm'"),
    ],
)
def test_triton_models_we_cannot_serve_say_why(text, reason):
    with pytest.raises(RepositoryConfigError, match=r"^config.pbtxt: ") as info:
        parse_triton_config(text, "m")
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("max_batch_size: 4\ninput [{ name: 'x' data_type: TYPE_FOO dims: [1] }]", "2:31 : data_type:"),
        ('max_batch_size: "x"', "1:17 : max_batch_size:"),
        ("input [ { name: 'x'", 'Expected "}"'),
        ("max_batch_size: 4 max_batch_size: 5", 'multiple "max_batch_size" fields'),
        ("input [{ name: 'x' dims: [1] }]", "input 'x' has no data_type"),
        ("max_batch_size: 2\ndynamic_batching { preferred_batch_size: [4] }", "exceed max_batch_size 2"),
        ("input [{ name: 'x' data_type: TYPE_FP32 dims: [4] reshape { shape: [3] } }]", "holds 3 elements"),
    ],
)
def test_triton_config_errors_point_at_the_problem(text, hint):
    with pytest.raises(RepositoryConfigError, match=r"^config.pbtxt: ") as info:
        parse_triton_config(text, "m")
    assert hint in str(info.value)


def test_triton_repository_folder(tmp_path):
    """A Triton model folder with no platform: the backend comes from the file, as Triton's does."""
    touch(tmp_path / "simple" / "config.pbtxt", "max_batch_size: 8\n")
    touch(tmp_path / "simple" / "1" / "model.onnx")
    source = read_model_config(tmp_path / "simple")
    assert source.source == "config.pbtxt" and source.config.backend == "onnxruntime"
    assert source.inferred == {"backend": "onnxruntime (from 1/model.onnx)"}
    touch(tmp_path / "broken" / "config.pbtxt", "max_batch_size: [")
    with pytest.raises(RepositoryConfigError) as info:
        read_model_config(tmp_path / "broken")
    assert str(tmp_path / "broken" / "config.pbtxt") in str(info.value)
