"""config.toml validation and the repository layout (tensorwire.repository).

Every invalid config must fail with a RepositoryConfigError whose message
names the file and the offending field, so that a user can fix it without
reading our code.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tensorwire.repository import (
    CONFIG_FILE,
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    RepositoryConfigError,
    TensorSpec,
    VersionPolicy,
    available_versions,
    check_model_name,
    list_models,
    load_model_config,
    parse_model_config,
    write_model_config,
)

#: The full example of README's Model repository section (one long comment shortened).
DESIGN_CONFIG = """\
backend = "onnxruntime"            # or "torchscript"
max_batch_size = 64                # 0 = the model takes no batch dimension
version_policy = { latest = 1 }    # or { all = true } or { specific = [1, 2] }

inputs = [  # dims without the batch dimension; -1 = variable
  { name = "INPUT0", datatype = "FP32", dims = [1, 8, 8] },
]
outputs = [
  { name = "OUTPUT0", datatype = "FP32", dims = [10] },
]

[dynamic_batching]
max_queue_delay_us = 500          # the most a request may wait for companions
preferred_batch_sizes = [16, 32]
max_queue_size = 1024             # beyond: RESOURCE_EXHAUSTED at once
default_timeout_us = 0            # queue timeout when the request carries no deadline (0 = none)
priority_levels = 2

[[instance_group]]
kind = "gpu"                      # "cpu" | "gpu" | "auto"
count = 1                         # replicas per listed device
gpus = [0, 1]                     # default: all visible

[metadata]                        # free-form strings, returned as ModelConfig parameters
"""


def write(tmp_path: Path, text: str, model: str = "digits_cnn") -> Path:
    model_dir = tmp_path / model
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(textwrap.dedent(text), encoding="utf-8")
    return model_dir


def load_error(tmp_path: Path, text: str) -> str:
    model_dir = write(tmp_path, text)
    with pytest.raises(RepositoryConfigError) as info:
        load_model_config(model_dir)
    message = str(info.value)
    assert str(model_dir / CONFIG_FILE) in message, message  # always names the file
    return message


MINIMAL = """\
backend = "onnxruntime"
max_batch_size = 8
inputs = [{ name = "INPUT0", datatype = "FP32", dims = [4] }]
outputs = [{ name = "OUTPUT0", datatype = "FP32", dims = [2] }]
"""


# ------------------------------------------------------------ valid configs


def test_design_example_parses(tmp_path):
    config = load_model_config(write(tmp_path, DESIGN_CONFIG))
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert config.version_policy == VersionPolicy(latest=1)
    assert config.inputs == [TensorSpec(name="INPUT0", datatype="FP32", dims=[1, 8, 8])]
    assert config.outputs == [TensorSpec(name="OUTPUT0", datatype="FP32", dims=[10])]
    batching = config.dynamic_batching
    assert (batching.max_queue_delay_us, batching.preferred_batch_sizes, batching.max_queue_size) == (
        500,
        [16, 32],
        1024,
    )
    assert (batching.default_timeout_us, batching.priority_levels) == (0, 2)
    assert config.instance_group == [InstanceGroup(kind="gpu", count=1, gpus=[0, 1])]
    assert config.metadata == {}
    assert config.batching
    assert config.model_filename == "model.onnx"
    assert config.platform == "onnxruntime_onnx"


def test_defaults(tmp_path):
    config = load_model_config(write(tmp_path, 'backend = "torchscript"\n'))
    assert config.max_batch_size is None and not config.batching  # completed from the model at load
    assert config.version_policy.select([1, 2, 3]) == [3]
    assert config.inputs is None and config.outputs is None  # read from the model file
    assert config.instance_group == [InstanceGroup(kind="auto", count=1)]
    assert config.dynamic_batching == DynamicBatching()
    assert config.model_filename == "model.pt" and config.platform == "pytorch_libtorch"


def test_full_config_with_every_field(tmp_path):
    config = load_model_config(
        write(
            tmp_path,
            """\
            backend = "python"
            max_batch_size = 4
            version_policy = { specific = [1, 3] }
            default_model_filename = "net.py"
            warmup = "powers_of_two"
            inputs = [
              { name = "TEXT", datatype = "BYTES", dims = [-1] },
              { name = "MASK", datatype = "BOOL", dims = [] },
            ]
            outputs = [{ name = "SCORES", datatype = "BF16", dims = [3, -1] }]

            [dynamic_batching]
            enabled = false
            max_queue_delay_us = 0
            preferred_batch_sizes = [2, 4]
            max_queue_size = 1
            default_timeout_us = 2000000
            priority_levels = 3
            default_priority_level = 2

            [[instance_group]]
            kind = "cpu"
            count = 2
            threads = 4

            [[instance_group]]
            kind = "auto"

            [metadata]
            accuracy = "0.987"
            "source checkpoint" = "runs/7/last.pt"
            """,
        )
    )
    assert config.model_filename == "net.py"
    assert config.warmup == "powers_of_two"
    assert not config.batching  # enabled = false
    assert [g.kind for g in config.instance_group] == ["cpu", "auto"]
    assert config.instance_group[0].threads == 4
    assert config.metadata == {"accuracy": "0.987", "source checkpoint": "runs/7/last.pt"}
    assert config.version_policy.select([1, 2, 3, 4]) == [1, 3]


# ------------------------------------------------------------ invalid configs


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        # unknown keys, top level and in sections
        (MINIMAL + "max_batch = 4\n", "max_batch", "unknown key"),
        (MINIMAL + "[dynamic_batching]\nmax_delay_us = 5\n", "dynamic_batching.max_delay_us", "unknown key"),
        (MINIMAL + "[[instance_group]]\ndevices = [0]\n", "instance_group.0.devices", "unknown key"),
        (
            'backend = "onnxruntime"\n'
            'inputs = [{ name = "A", datatype = "FP32", dims = [1], shape = [1] }]\n',
            "inputs.0.shape",
            "unknown key",
        ),
        (
            'backend = "onnxruntime"\nversion_policy = { newest = 1 }\n',
            "version_policy.newest",
            "unknown key",
        ),
        # wrong types (TOML values are typed: no coercion)
        ('backend = "onnxruntime"\nmax_batch_size = "64"\n', "max_batch_size", "valid integer"),
        ('backend = "onnxruntime"\nmax_batch_size = 64.0\n', "max_batch_size", "valid integer"),
        ('backend = "onnxruntime"\nmax_batch_size = true\n', "max_batch_size", "valid integer"),
        (
            'backend = "onnxruntime"\n[dynamic_batching]\nenabled = "yes"\n',
            "dynamic_batching.enabled",
            "valid boolean",
        ),
        ('backend = "onnxruntime"\ninputs = "INPUT0"\n', "inputs", "valid list"),
        (
            'backend = "onnxruntime"\ninputs = [{ name = "A", datatype = "FP32", dims = [1, "8"] }]\n',
            "inputs.0.dims.1",
            "valid integer",
        ),
        ('backend = "onnxruntime"\n[metadata]\naccuracy = 0.98\n', "metadata.accuracy", "valid string"),
        ("backend = 1\n", "backend", "onnxruntime"),
        # ranges
        ('backend = "onnxruntime"\nmax_batch_size = -1\n', "max_batch_size", "greater than or equal to 0"),
        (
            'backend = "onnxruntime"\nmax_batch_size = 8\n'
            "[dynamic_batching]\npreferred_batch_sizes = [4, 16]\n",
            "field 'dynamic_batching'",
            "preferred_batch_sizes [16] exceed max_batch_size 8",
        ),
        (
            'backend = "onnxruntime"\n[dynamic_batching]\nmax_queue_size = 0\n',
            "dynamic_batching.max_queue_size",
            ">= 1",
        ),
        (
            'backend = "onnxruntime"\n[dynamic_batching]\npriority_levels = 2\ndefault_priority_level = 3\n',
            "default_priority_level",
            "exceeds priority_levels 2",
        ),
        # tensors
        ('backend = "onnxruntime"\ninputs = []\n', "inputs", "is empty"),
        ('backend = "onnxruntime"\noutputs = []\n', "outputs", "is empty"),
        (
            'backend = "onnxruntime"\ninputs = [{ name = "A", datatype = "FP32", dims = [1] },'
            ' { name = "A", datatype = "INT64", dims = [2] }]\n',
            "inputs",
            "repeat the tensor name(s) ['A']",
        ),
        (
            'backend = "onnxruntime"\noutputs = [{ name = "A", datatype = "FP32", dims = [1, 0] }]\n',
            "outputs.0.dims",
            "contain 0",
        ),
        (
            'backend = "onnxruntime"\ninputs = [{ name = "A", datatype = "FP32", dims = [-2] }]\n',
            "inputs.0.dims.0",
            "greater than or equal to -1",
        ),
        (
            'backend = "onnxruntime"\ninputs = [{ name = "A", datatype = "FLOAT32", dims = [1] }]\n',
            "inputs.0.datatype",
            "'FLOAT32'",
        ),
        (
            'backend = "onnxruntime"\ninputs = [{ name = "", datatype = "FP32", dims = [1] }]\n',
            "inputs.0.name",
            "at least 1",
        ),
        (
            'backend = "onnxruntime"\ninputs = [{ datatype = "FP32", dims = [1] }]\n',
            "inputs.0.name",
            "required",
        ),
        # backend
        ('backend = "tensorflow"\n', "backend", "'tensorflow'"),
        ("max_batch_size = 4\n", "backend", "no version folder to tell the backend from"),
        # version policy
        ('backend = "onnxruntime"\nversion_policy = { latest = 0 }\n', "version_policy.latest", ">= 1"),
        ('backend = "onnxruntime"\nversion_policy = {}\n', "version_policy", "exactly one of"),
        (
            'backend = "onnxruntime"\nversion_policy = { latest = 1, all = true }\n',
            "version_policy",
            "exactly one of",
        ),
        ('backend = "onnxruntime"\nversion_policy = { all = false }\n', "version_policy", "selects nothing"),
        (
            'backend = "onnxruntime"\nversion_policy = { specific = [0] }\n',
            "version_policy.specific.0",
            ">= 1",
        ),
        ('backend = "onnxruntime"\nversion_policy = "latest"\n', "version_policy", "VersionPolicy"),
        # instance groups
        (
            'backend = "onnxruntime"\n[[instance_group]]\nkind = "cpu"\ngpus = [0]\n',
            "instance_group.0",
            "gpus is set but kind is 'cpu'",
        ),
        ('backend = "onnxruntime"\n[[instance_group]]\nkind = "tpu"\n', "instance_group.0.kind", "'tpu'"),
        ('backend = "onnxruntime"\n[[instance_group]]\ncount = 0\n', "instance_group.0.count", ">= 1"),
        ('backend = "onnxruntime"\n[[instance_group]]\ngpus = [-1]\n', "instance_group.0.gpus.0", ">= 0"),
        # other fields
        ('backend = "onnxruntime"\nwarmup = "always"\n', "warmup", "'always'"),
        (
            'backend = "onnxruntime"\ndefault_model_filename = "../x.onnx"\n',
            "default_model_filename",
            "plain file name",
        ),
        (
            'backend = "onnxruntime"\ndefault_model_filename = "v\\\\x.onnx"\n',
            "default_model_filename",
            "plain file name",
        ),
    ],
)
def test_invalid_config_names_file_and_field(tmp_path, text, field, hint):
    message = load_error(tmp_path, text)
    assert field in message, message
    hint = hint.replace(">= 1", "greater than or equal to 1").replace(">= 0", "greater than or equal to 0")
    assert hint in message, message


def test_several_errors_are_reported_together(tmp_path):
    message = load_error(tmp_path, 'backend = "onnxruntime"\nmax_batch_size = -1\nwarmup = "x"\ncolour = 1\n')
    assert "max_batch_size" in message and "warmup" in message and "colour" in message


def test_invalid_toml(tmp_path):
    message = load_error(tmp_path, 'backend = "onnxruntime"\nmax_batch_size = \n')
    assert "not valid TOML" in message and "line 2" in message


def test_empty_model_folder(tmp_path):
    model_dir = tmp_path / "ghost"
    model_dir.mkdir()
    with pytest.raises(RepositoryConfigError, match="no version folder to tell the backend from") as info:
        load_model_config(model_dir)
    assert str(model_dir) in str(info.value)


def test_unreadable_file(tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / CONFIG_FILE).mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(RepositoryConfigError, match="cannot be read") as info:
        load_model_config(model_dir)
    assert str(model_dir / CONFIG_FILE) in str(info.value)
    other = tmp_path / "latin1"
    other.mkdir()
    (other / CONFIG_FILE).write_bytes('backend = "onnxruntime"\n# caf\xe9\n'.encode("latin-1"))
    with pytest.raises(RepositoryConfigError, match="not UTF-8") as info:
        load_model_config(other)
    assert str(other / CONFIG_FILE) in str(info.value)


def test_parse_model_config_names_its_source():
    with pytest.raises(RepositoryConfigError, match=r"^somewhere/config.toml: field 'backend'"):
        parse_model_config({"backend": "nope"}, "somewhere/config.toml")
    with pytest.raises(RepositoryConfigError, match=r"^config.toml: "):
        parse_model_config({"max_batch_size": -1})


def test_config_is_immutable():
    config = parse_model_config({"backend": "onnxruntime"})
    with pytest.raises(Exception, match="frozen"):
        config.max_batch_size = 3


# ------------------------------------------------------------ version policy


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        ({"latest": 1}, [1, 2, 3], [3]),
        ({"latest": 2}, [3, 1, 10, 2], [3, 10]),
        ({"latest": 5}, [2, 1], [1, 2]),
        ({"latest": 1}, [], []),
        ({"all": True}, [4, 1, 2], [1, 2, 4]),
        ({"specific": [1, 3]}, [1, 2, 3, 4], [1, 3]),
        ({"specific": [3, 7]}, [1, 2, 3], [3]),  # a listed version that is absent is skipped
        ({"specific": [2, 2]}, [1, 2], [2]),
    ],
)
def test_version_policy_select(tmp_path, policy, available, expected):
    inline = ", ".join(f"{k} = {str(v).lower()}" for k, v in policy.items())
    config = load_model_config(write(tmp_path, f'backend = "onnxruntime"\nversion_policy = {{ {inline} }}\n'))
    assert config.version_policy.select(available) == expected


def test_version_policy_with_repository_folders(tmp_path):
    model_dir = write(tmp_path, 'backend = "onnxruntime"\nversion_policy = { latest = 2 }\n')
    for name in ("1", "2", "10", ".tmp-3", "0", "latest", "3.old", "007", "²", "١"):
        (model_dir / name).mkdir()
    (model_dir / "4").write_text("a file, not a version folder")
    assert available_versions(model_dir) == [1, 2, 10]
    config = load_model_config(model_dir)
    assert config.version_policy.select(available_versions(model_dir)) == [2, 10]


def test_available_versions_of_missing_folder(tmp_path):
    assert available_versions(tmp_path / "absent") == []


# ------------------------------------------------------------ model names


@pytest.mark.parametrize("name", ["digits_cnn-2.v1", "a", "A1", "9lives", "x" * 128])
def test_model_name_accepted(name):
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "",
        "a/b",
        "a\\b",
        "/abs",
        "../up",
        "with space",
        " lead",
        "trail ",
        ".hidden",
        "-dash",
        "_under",
        "name\n",
        "a\x00b",
        "é",
        "x" * 129,
        "tab\there",
    ],
)
def test_model_name_rejected(name):
    with pytest.raises(RepositoryConfigError, match="invalid model name"):
        check_model_name(name)


# ------------------------------------------------------------ listing and writing


def test_list_models(tmp_path):
    write(tmp_path, 'backend = "onnxruntime"\n', "b_model")
    write(tmp_path, 'backend = "onnxruntime"\n', "a_model")
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "stray.toml").write_text("")
    assert list_models(tmp_path) == ["a_model", "b_model"]
    assert list_models(tmp_path / "absent") == []


@pytest.mark.parametrize(
    "text", [DESIGN_CONFIG, 'backend = "torchscript"\n', MINIMAL + '[metadata]\nacc = "0.9"\n']
)
def test_write_then_load_round_trips(tmp_path, text):
    original = load_model_config(write(tmp_path / "src", text))
    out_dir = tmp_path / "repo" / "digits_cnn"
    path = write_model_config(original, out_dir)
    assert path == out_dir / CONFIG_FILE
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_FILE]  # no temp file left behind
    assert load_model_config(out_dir) == original
    # writing again over an existing file works too
    write_model_config(original, out_dir)
    assert load_model_config(out_dir) == original


def test_written_config_leaves_defaults_out(tmp_path):
    config = parse_model_config({"backend": "onnxruntime", "max_batch_size": 4})
    text = write_model_config(config, tmp_path / "m").read_text()
    assert 'backend = "onnxruntime"' in text and "max_batch_size = 4" in text
    assert "dynamic_batching" not in text and "instance_group" not in text


def test_write_built_config_round_trips(tmp_path):
    config = ModelConfigFile(
        backend="onnxruntime",
        max_batch_size=32,
        version_policy=VersionPolicy(all=True),
        inputs=[TensorSpec(name="INPUT0", datatype="UINT8", dims=[-1, 3])],
        outputs=[TensorSpec(name="OUTPUT0", datatype="BYTES", dims=[1])],
        dynamic_batching=DynamicBatching(preferred_batch_sizes=[8, 32], priority_levels=2),
        instance_group=[InstanceGroup(kind="cpu", count=3, threads=2)],
        metadata={"accuracy": "0.991", "label": "ünïcode"},
    )
    write_model_config(config, tmp_path / "m")
    assert load_model_config(tmp_path / "m") == config
