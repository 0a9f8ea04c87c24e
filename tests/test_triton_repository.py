"""A Triton model repository served unchanged, called with Triton's own client.

The layout is the one Triton's documentation and quickstart show::

    model_repository/
      densenet_onnx/config.pbtxt  densenet_onnx/densenet_labels.txt  densenet_onnx/1/model.onnx
      simple/config.pbtxt         simple/1/model.onnx                 simple/2/model.onnx
      simple_sequence/...         inception_graphdef/...              ensemble_model/...

(the ONNX files are small stand-ins with the same tensors). What tensorwire cannot serve (a sequence
model, a TensorFlow GraphDef, an ensemble, a TensorRT plan) shows UNAVAILABLE with the reason, while the
rest serves. ModelConfig is compared with what Triton's own protobuf classes read from the same file.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

# tritonclient (package `inference` in the default pool) is imported before ours (`tensorwire.v2`).
import tritonclient.grpc as tritongrpc
from byom_models import add_sub, densenet_like, densenet_pbtxt, touch_text, wait_settled
from google.protobuf import json_format, text_format
from serving import running_server
from tritonclient.grpc import model_config_pb2 as triton_config_pb
from tritonclient.utils import InferenceServerException

DENSENET = densenet_pbtxt()

SIMPLE = """\
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { all { }}
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
instance_group [
  {
    count: 2
    kind: KIND_CPU
  }
]
parameters {
  key: "source"
  value: { string_value: "the simple example of Triton's quickstart, as ONNX" }
}
"""

SEQUENCE = """\
name: "simple_sequence"
platform: "onnxruntime_onnx"
max_batch_size: 8
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [
    {
      name: "START"
      control [ { kind: CONTROL_SEQUENCE_START fp32_false_true: [ 0, 1 ] } ]
    }
  ]
}
input [ { name: "INPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT" data_type: TYPE_INT32 dims: [ 1 ] } ]
"""

GRAPHDEF = """\
name: "inception_graphdef"
platform: "tensorflow_graphdef"
max_batch_size: 128
input [ { name: "input" data_type: TYPE_FP32 format: FORMAT_NHWC dims: [ 299, 299, 3 ] } ]
output [ { name: "InceptionV3/Predictions/Softmax" data_type: TYPE_FP32 dims: [ 1001 ] label_filename: "l.txt" } ]
"""

ENSEMBLE = """\
name: "ensemble_model"
platform: "ensemble"
max_batch_size: 8
input [ { name: "RAW" data_type: TYPE_INT32 dims: [ 16 ] } ]
output [ { name: "SUM" data_type: TYPE_INT32 dims: [ 16 ] } ]
ensemble_scheduling {
  step [
    {
      model_name: "simple"
      model_version: -1
      input_map { key: "INPUT0" value: "RAW" }
      input_map { key: "INPUT1" value: "RAW" }
      output_map { key: "OUTPUT0" value: "SUM" }
    }
  ]
}
"""

READY = ["densenet_onnx", "simple"]
UNAVAILABLE = {
    "simple_sequence": "sequence_batching: sequence batching",
    "inception_graphdef": "platform 'tensorflow_graphdef' is a TensorFlow GraphDef",
    "ensemble_model": "ensemble_scheduling: ensemble scheduling (a pipeline of other models)",
    "plan_model": "1/model.plan (a TensorRT plan) cannot be served",
    "both_configs": "holds both config.toml and config.pbtxt; keep one",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton") / "model_repository"
    _, weights = densenet_like(repo / "densenet_onnx" / "1" / "model.onnx")
    touch_text(repo / "densenet_onnx" / "config.pbtxt", DENSENET)
    touch_text(repo / "densenet_onnx" / "densenet_labels.txt", "\n".join(f"class{i}" for i in range(10)))
    for version in (1, 2):
        add_sub(repo / "simple" / str(version) / "model.onnx")
    touch_text(repo / "simple" / "config.pbtxt", SIMPLE)
    add_sub(repo / "simple_sequence" / "1" / "model.onnx", dims=1)
    touch_text(repo / "simple_sequence" / "config.pbtxt", SEQUENCE)
    touch_text(repo / "inception_graphdef" / "config.pbtxt", GRAPHDEF)
    touch_text(repo / "inception_graphdef" / "1" / "model.graphdef", "not a graph")
    touch_text(repo / "ensemble_model" / "config.pbtxt", ENSEMBLE)
    (repo / "ensemble_model" / "1").mkdir()  # Triton wants an (empty) version folder for an ensemble
    touch_text(repo / "plan_model" / "1" / "model.plan", "not a plan")
    add_sub(repo / "both_configs" / "1" / "model.onnx")
    touch_text(repo / "both_configs" / "config.pbtxt", "max_batch_size: 8\n")
    touch_text(repo / "both_configs" / "config.toml", "max_batch_size = 8\n")
    with running_server(repo, wait=False) as running:
        running.extra["states"] = wait_settled(running, READY + list(UNAVAILABLE))
        running.extra["weights"] = weights
        yield running


@pytest.fixture(scope="module")
def triton(server):
    client = tritongrpc.InferenceServerClient(server.address)
    yield client
    client.close()


def triton_reads(text: str) -> dict:
    """The file as Triton's own protobuf classes read it, as the JSON ModelConfig answers carry."""
    return json_format.MessageToDict(
        text_format.Parse(text, triton_config_pb.ModelConfig()), preserving_proto_field_name=True
    )


def honoured(config: dict) -> dict:
    """The settings tensorwire honours, as Triton's JSON spells them."""
    keep = {"name", "platform", "max_batch_size", "version_policy", "dynamic_batching", "parameters"}
    out = {k: v for k, v in config.items() if k in keep}
    for key in ("input", "output"):
        out[key] = [{k: t[k] for k in ("name", "data_type", "dims", "reshape") if k in t} for t in config.get(key, [])]
    out["instance_group"] = [{k: g[k] for k in ("kind", "count", "gpus") if k in g} for g in config["instance_group"]]
    return out


def test_what_serves_and_what_cannot(server, triton):
    index = {m.name: m for m in triton.get_model_repository_index().models}
    assert sorted(index) == sorted(READY + list(UNAVAILABLE))
    for name in READY:
        assert triton.is_model_ready(name), server.extra["states"][name]
    for name, reason in UNAVAILABLE.items():
        assert index[name].state == "UNAVAILABLE"
        assert reason in index[name].reason, (name, index[name].reason)
        assert not triton.is_model_ready(name)
    assert triton.is_server_live()


def test_densenet_quickstart_model_with_reshape(server, triton):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((3, 8, 8)).astype(np.float32)
    data = tritongrpc.InferInput("data_0", [3, 8, 8], "FP32")  # max_batch_size 0: no batch dimension
    data.set_data_from_numpy(image)
    result = triton.infer("densenet_onnx", [data], outputs=[tritongrpc.InferRequestedOutput("fc6_1")])
    scores = result.as_numpy("fc6_1")
    assert scores.shape == (10,)  # the model's [1, 10, 1, 1], reshaped as configured
    np.testing.assert_allclose(scores, server.extra["weights"] @ image.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    metadata = triton.get_model_metadata("densenet_onnx", as_json=True)
    assert metadata["platform"] == "onnxruntime_onnx"
    assert [i["shape"] for i in metadata["inputs"]] == [["3", "8", "8"]]


def test_model_config_returns_what_the_pbtxt_said(triton):
    for name, text in (("densenet_onnx", DENSENET), ("simple", SIMPLE)):
        served = triton.get_model_config(name, as_json=True)["config"]
        expected = triton_reads(text)
        # Triton's defaults for what the file leaves out (KIND_AUTO is the enum's zero: JSON omits it).
        expected.setdefault("instance_group", [{"count": 1}])
        expected.setdefault("version_policy", {"latest": {"num_versions": 1}})
        served_batching, expected_batching = served.pop("dynamic_batching", {}), expected.pop("dynamic_batching", {})
        assert honoured(served) == honoured(expected), name
        # What the file said, plus the effective settings it left to the server (queue bound, one level).
        assert served_batching == expected_batching | (
            {
                "priority_levels": "1",
                "default_queue_policy": {"allow_timeout_override": True, "max_queue_size": 1024},
            }
            if expected_batching
            else {}
        ), name
    simple = triton.get_model_config("simple").config  # the protobuf form too
    assert list(simple.dynamic_batching.preferred_batch_size) == [4, 8]
    assert simple.dynamic_batching.max_queue_delay_microseconds == 100
    assert simple.version_policy.HasField("all")
    assert simple.parameters["source"].string_value.startswith("the simple example")


def test_every_version_serves_with_triton_batching(triton):
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.ones((2, 16), np.int32)
    inputs = []
    for name, array in (("INPUT0", a), ("INPUT1", b)):
        tensor = tritongrpc.InferInput(name, list(array.shape), "INT32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    for version in ("1", "2"):
        result = triton.infer("simple", inputs, model_version=version)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    too_big = [tritongrpc.InferInput(n, [9, 16], "INT32") for n in ("INPUT0", "INPUT1")]
    for tensor in too_big:
        tensor.set_data_from_numpy(np.zeros((9, 16), np.int32))
    with pytest.raises(InferenceServerException, match="max_batch_size 8"):
        triton.infer("simple", too_big)


def test_settings_we_do_not_honour_are_in_the_log(server):
    log = server.log()
    assert "event=config_ignored model=densenet_onnx config=config.pbtxt" in log
    assert "input[data_0].format: not supported (ignored)" in log
    assert "output[fc6_1].label_filename: not supported (ignored)" in log


def test_unavailable_models_refuse_inference_with_the_reason(triton):
    tensor = tritongrpc.InferInput("INPUT", [1, 1], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 1), np.int32))
    with pytest.raises(InferenceServerException, match="sequence batching") as info:
        triton.infer("simple_sequence", [tensor])
    assert "StatusCode.UNAVAILABLE" in str(info.value.status())


def test_readme_example_repository_text_parses(tmp_path):
    """The config.pbtxt written out in README's "Migrating from Triton" parses as documented."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Migrating from Triton", 1)[1]
    text = section.split("```protobuf\n", 1)[1].split("```", 1)[0]
    from tensorwire.repository import parse_triton_config

    triton = parse_triton_config(textwrap.dedent(text), "resnet")
    assert triton.config.backend == "onnxruntime" and triton.config.max_batch_size == 32
    assert triton.ignored == ["optimization: not supported (ignored)"]
