"""The wire contract: our messages and service against Triton's published ones.

Only field numbers, wire types and the service path travel on the wire, so
that is what must match: every field we declare exists in tritonclient's
``inference`` descriptors with the same number, name, type and cardinality,
every method exists with the same streaming flags, and messages serialized by
either side parse on the other. Our messages live in ``tensorwire.v2`` so both
generated modules can be imported into one process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import tritonclient.grpc  # noqa: F401  (the coexistence requirement: both in one process)
import tritonclient.grpc.model_config_pb2 as triton_config_pb
import tritonclient.grpc.service_pb2 as triton_pb
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet

from tensorwire.proto import generate, service
from tensorwire.proto import inference_pb2 as pb

OUR_PACKAGE = "tensorwire.v2"
STANDARD_SERVICE = "inference.GRPCInferenceService"
OUR_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
TRITON_SERVICE = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

#: The RPCs we serve: the core protocol plus Triton's extensions.
EXPECTED_METHODS = {
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
}


def relative(full_name: str) -> str:
    """A type's name inside its package: 'ModelInferRequest.InferInputTensor'."""
    for package in (OUR_PACKAGE, "inference"):
        if full_name.startswith(package + "."):
            return full_name[len(package) + 1 :]
    raise AssertionError(f"{full_name} is in neither {OUR_PACKAGE} nor inference")


def _walk_triton() -> dict[str, Descriptor | EnumDescriptor]:
    types: dict[str, Descriptor | EnumDescriptor] = {}

    def add(message: Descriptor) -> None:
        types[relative(message.full_name)] = message
        for nested in message.nested_types:
            add(nested)
        for enum in message.enum_types:
            types[relative(enum.full_name)] = enum

    for module in (triton_pb, triton_config_pb):
        assert module.DESCRIPTOR.package == "inference"
        for message in module.DESCRIPTOR.message_types_by_name.values():
            add(message)
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            types[relative(enum.full_name)] = enum
    return types


def reachable(service_descriptor) -> tuple[dict[str, Descriptor], dict[str, EnumDescriptor]]:
    """Every message and enum type reachable from a service's methods, recursively."""
    messages: dict[str, Descriptor] = {}
    enums: dict[str, EnumDescriptor] = {}

    def visit(message: Descriptor) -> None:
        if message.full_name in messages:
            return
        messages[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                visit(field.message_type)
            if field.enum_type is not None:
                enums[field.enum_type.full_name] = field.enum_type

    for method in service_descriptor.methods:
        visit(method.input_type)
        visit(method.output_type)
    return messages, enums


TRITON_TYPES = _walk_triton()
OUR_MESSAGES, OUR_ENUMS = reachable(OUR_SERVICE)


def _all_our_messages() -> set[str]:
    names: set[str] = set()

    def add(message: Descriptor) -> None:
        names.add(message.full_name)
        for nested in message.nested_types:
            add(nested)

    for message in pb.DESCRIPTOR.message_types_by_name.values():
        add(message)
    return names


def assert_field_matches(ours: FieldDescriptor, theirs: FieldDescriptor | None, where: str) -> None:
    label = f"{where}.{ours.name} = {ours.number}"
    assert theirs is not None, f"{label}: Triton has no field number {ours.number}"
    assert theirs.number == ours.number, f"{label}: Triton numbers it {theirs.number}"
    assert theirs.name == ours.name, f"{label}: Triton's field {theirs.number} is named {theirs.name!r}"
    assert theirs.type == ours.type, f"{label}: type {ours.type} but Triton's is {theirs.type}"
    assert theirs.is_repeated == ours.is_repeated, (
        f"{label}: repeated={ours.is_repeated}, Triton's {theirs.is_repeated}"
    )
    if ours.message_type is not None:
        assert relative(theirs.message_type.full_name) == relative(ours.message_type.full_name), label
        assert theirs.message_type.GetOptions().map_entry == ours.message_type.GetOptions().map_entry, label
    if ours.enum_type is not None:
        assert relative(theirs.enum_type.full_name) == relative(ours.enum_type.full_name), label
    our_oneof = ours.containing_oneof.name if ours.containing_oneof else None
    their_oneof = theirs.containing_oneof.name if theirs.containing_oneof else None
    assert our_oneof == their_oneof, f"{label}: oneof {our_oneof!r} but Triton's is {their_oneof!r}"


def assert_message_matches(ours: Descriptor) -> None:
    name = relative(ours.full_name)
    theirs = TRITON_TYPES.get(name)
    assert isinstance(theirs, Descriptor), f"Triton has no message inference.{name}"
    for field in ours.fields:
        assert_field_matches(field, theirs.fields_by_number.get(field.number), name)


def assert_enum_matches(ours: EnumDescriptor) -> None:
    name = relative(ours.full_name)
    theirs = TRITON_TYPES.get(name)
    assert isinstance(theirs, EnumDescriptor), f"Triton has no enum inference.{name}"
    their_values = {v.name: v.number for v in theirs.values}
    for value in ours.values:
        assert their_values.get(value.name) == value.number, (
            f"{name}.{value.name} = {value.number}; Triton's is {their_values.get(value.name)}"
        )


# ------------------------------------------------------------ (a) wire compatibility


def test_our_package_is_not_inference():
    assert pb.DESCRIPTOR.package == OUR_PACKAGE
    assert OUR_SERVICE.full_name == f"{OUR_PACKAGE}.GRPCInferenceService"


def test_every_message_we_define_is_used_by_the_service():
    # so that the comparison below checks every message the file declares
    assert set(OUR_MESSAGES) == _all_our_messages()
    assert len(OUR_MESSAGES) > 40
    assert {relative(e) for e in OUR_ENUMS} == {
        "DataType",
        "ModelInstanceGroup.Kind",
        "ModelQueuePolicy.TimeoutAction",
    }


@pytest.mark.parametrize("name", sorted(relative(n) for n in OUR_MESSAGES))
def test_message_matches_triton(name):
    assert_message_matches(OUR_MESSAGES[f"{OUR_PACKAGE}.{name}"])


@pytest.mark.parametrize("name", sorted(relative(n) for n in OUR_ENUMS))
def test_enum_matches_triton(name):
    assert_enum_matches(OUR_ENUMS[f"{OUR_PACKAGE}.{name}"])


def test_service_methods_match_triton():
    assert {m.name for m in OUR_SERVICE.methods} == EXPECTED_METHODS
    for ours in OUR_SERVICE.methods:
        theirs = TRITON_SERVICE.methods_by_name.get(ours.name)
        assert theirs is not None, f"Triton's service has no {ours.name}"
        assert (ours.client_streaming, ours.server_streaming) == (
            theirs.client_streaming,
            theirs.server_streaming,
        ), ours.name
        assert relative(ours.input_type.full_name) == relative(theirs.input_type.full_name), ours.name
        assert relative(ours.output_type.full_name) == relative(theirs.output_type.full_name), ours.name
    stream = OUR_SERVICE.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


def test_design_specifics():
    # InferParameter: all five choices, Triton's numbers (priority is uint64, timeout int64)
    choices = pb.InferParameter.DESCRIPTOR.oneofs_by_name["parameter_choice"].fields
    assert {(f.name, f.number) for f in choices} == {
        ("bool_param", 1),
        ("int64_param", 2),
        ("string_param", 3),
        ("double_param", 4),
        ("uint64_param", 5),
    }
    fields = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name
    assert (fields["error_message"].number, fields["infer_response"].number) == (1, 2)
    config = pb.ModelConfig.DESCRIPTOR.fields_by_name
    for name in (
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
        "version_policy",
    ):
        assert name in config, name


def test_the_checker_catches_a_mismatch():
    """The comparison itself fails on a wrong number, name, type or cardinality."""
    fake = descriptor_pb2.FileDescriptorProto(name="fake.proto", package="inference", syntax="proto3")
    message = fake.message_type.add(name="ModelReadyRequest")
    F = descriptor_pb2.FieldDescriptorProto
    message.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_REPEATED)  # cardinality
    message.field.add(name="version", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)  # type
    message.field.add(name="model", number=3, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fake)
    theirs = pool.FindMessageTypeByName("inference.ModelReadyRequest")
    ours = pb.ModelReadyRequest.DESCRIPTOR
    with pytest.raises(AssertionError, match="repeated=False, Triton's True"):
        assert_field_matches(ours.fields_by_name["name"], theirs.fields_by_number[1], "ModelReadyRequest")
    with pytest.raises(AssertionError, match="ModelReadyRequest.version = 2: type 9 but Triton's is 3"):
        assert_field_matches(ours.fields_by_name["version"], theirs.fields_by_number[2], "ModelReadyRequest")
    with pytest.raises(AssertionError, match="ModelReadyRequest.version = 2: Triton numbers it 1"):
        assert_field_matches(ours.fields_by_name["version"], theirs.fields_by_number[1], "ModelReadyRequest")
    with pytest.raises(AssertionError, match="Triton's field 3 is named 'model'"):
        assert_field_matches(
            pb.ModelInferRequest.DESCRIPTOR.fields_by_name["id"],
            theirs.fields_by_number[3],
            "ModelInferRequest",
        )
    with pytest.raises(AssertionError, match="ModelReadyRequest.version = 2: Triton has no field number 2"):
        assert_field_matches(
            ours.fields_by_name["version"], theirs.fields_by_number.get(4), "ModelReadyRequest"
        )


COEXIST = """
import {first}, {second}
import tritonclient.grpc.service_pb2 as triton_pb
from tensorwire.proto import inference_pb2 as pb
from google.protobuf import descriptor_pool
pool = descriptor_pool.Default()
assert pool.FindMessageTypeByName("inference.ModelInferRequest").file.name == "grpc_service.proto"
assert pool.FindMessageTypeByName("tensorwire.v2.ModelInferRequest") is pb.ModelInferRequest.DESCRIPTOR
raw = pb.ModelInferRequest(model_name="m").SerializeToString()
assert triton_pb.ModelInferRequest.FromString(raw).model_name == "m"
print("ok")
"""


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("tritonclient.grpc", "tensorwire.proto.inference_pb2"),
        ("tensorwire.proto.inference_pb2", "tritonclient.grpc"),
    ],
    ids=["triton-first", "ours-first"],
)
def test_coexists_with_tritonclient_in_one_fresh_process(first, second):
    code = COEXIST.format(first=first, second=second)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_coexists_with_tritonclient_in_this_process():
    ours = pb.ServerLiveResponse(live=True)
    theirs = triton_pb.ServerLiveResponse(live=True)
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert type(ours).DESCRIPTOR.full_name != type(theirs).DESCRIPTOR.full_name


# ------------------------------------------------------------ (b) serialization cross-check

_SCALARS = {
    FieldDescriptor.TYPE_BOOL: [True, False],
    FieldDescriptor.TYPE_INT32: [-(2**31), 7],
    FieldDescriptor.TYPE_INT64: [-(2**63), 2**40 + 3],
    FieldDescriptor.TYPE_UINT32: [2**32 - 1, 1],
    FieldDescriptor.TYPE_UINT64: [2**64 - 1, 2],
    FieldDescriptor.TYPE_FLOAT: [0.5, -3.25],
    FieldDescriptor.TYPE_DOUBLE: [1e300, -0.125],
    FieldDescriptor.TYPE_STRING: ["héllo", ""],
    FieldDescriptor.TYPE_BYTES: [b"\x00\xff\x01", b"raw"],
}


def _scalar(field: FieldDescriptor, index: int):
    if field.type == FieldDescriptor.TYPE_ENUM:
        values = field.enum_type.values
        return values[(index + 1) % len(values)].number
    return _SCALARS[field.type][index % 2]


def fill(message, variant: int = 0, depth: int = 0) -> None:
    """Set every field of ``message`` (recursively); ``variant`` picks the member of each oneof."""
    descriptor = message.DESCRIPTOR
    skip = set()
    for oneof in descriptor.oneofs:
        members = list(oneof.fields)
        skip.update(f.name for i, f in enumerate(members) if i != variant % len(members))
    for field in descriptor.fields:
        if field.name in skip or depth > 6:
            continue
        container = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            for i in range(2):
                key = f"k{i}" if key_field.type == FieldDescriptor.TYPE_STRING else _scalar(key_field, i)
                if value_field.message_type is not None:
                    fill(container[key], variant + i, depth + 1)
                else:
                    container[key] = _scalar(value_field, i)
        elif field.is_repeated:
            for i in range(2):
                if field.message_type is not None:
                    fill(container.add(), variant + i, depth + 1)
                else:
                    container.append(_scalar(field, i))
        elif field.message_type is not None:
            fill(container, variant, depth + 1)
            if not container.ListFields():  # an empty message: mark it present
                container.SetInParent()
        else:
            setattr(message, field.name, _scalar(field, variant))


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def triton_class(name: str):
    return message_factory.GetMessageClass(TRITON_TYPES[name])


@pytest.mark.parametrize("variant", range(5))
@pytest.mark.parametrize(
    "name", sorted(relative(n) for n in OUR_MESSAGES if not OUR_MESSAGES[n].GetOptions().map_entry)
)
def test_fully_populated_messages_cross_parse(name, variant):
    ours_class = message_factory.GetMessageClass(OUR_MESSAGES[f"{OUR_PACKAGE}.{name}"])
    ours = ours_class()
    fill(ours, variant)
    wire = ours.SerializeToString(deterministic=True)
    theirs = triton_class(name).FromString(wire)
    assert as_dict(theirs) == as_dict(ours)
    assert len(UnknownFieldSet(theirs)) == 0  # Triton knows every field we sent
    back = ours_class.FromString(theirs.SerializeToString(deterministic=True))
    assert back == ours


def _triton_request() -> triton_pb.ModelInferRequest:
    request = triton_pb.ModelInferRequest(model_name="digits", model_version="2", id="req-7")
    request.parameters["priority"].uint64_param = 3
    request.parameters["timeout"].int64_param = 1500
    request.parameters["sequence_start"].bool_param = True
    request.parameters["tag"].string_param = "a/b"
    request.parameters["scale"].double_param = 0.25
    first = request.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 8])
    first.parameters["binary_data_size"].int64_param = 32
    second = request.inputs.add(name="TEXT", datatype="BYTES", shape=[2])
    second.contents.bytes_contents.extend([b"", b"\x00x"])
    third = request.inputs.add(name="IDS", datatype="INT64", shape=[3])
    third.contents.int64_contents.extend([-1, 0, 2**62])
    output = request.outputs.add(name="OUTPUT0")
    output.parameters["classification"].int64_param = 3
    request.raw_input_contents.extend([bytes(range(32)), b""])
    return request


def test_triton_request_parses_as_ours():
    theirs = _triton_request()
    ours = pb.ModelInferRequest.FromString(theirs.SerializeToString())
    assert (ours.model_name, ours.model_version, ours.id) == ("digits", "2", "req-7")
    assert ours.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert ours.parameters["priority"].uint64_param == 3
    assert ours.parameters["timeout"].int64_param == 1500
    assert ours.parameters["sequence_start"].bool_param is True
    assert ours.parameters["tag"].string_param == "a/b"
    assert ours.parameters["scale"].double_param == 0.25
    assert [(t.name, t.datatype, list(t.shape)) for t in ours.inputs] == [
        ("INPUT0", "FP32", [-1, 8]),
        ("TEXT", "BYTES", [2]),
        ("IDS", "INT64", [3]),
    ]
    assert ours.inputs[0].parameters["binary_data_size"].int64_param == 32
    assert list(ours.inputs[1].contents.bytes_contents) == [b"", b"\x00x"]
    assert list(ours.inputs[2].contents.int64_contents) == [-1, 0, 2**62]
    assert ours.outputs[0].name == "OUTPUT0"
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert list(ours.raw_input_contents) == [bytes(range(32)), b""]
    assert as_dict(ours) == as_dict(theirs)
    # and byte-identical when written back
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)


def test_our_response_parses_as_triton():
    ours = pb.ModelInferResponse(model_name="digits", model_version="1", id="req-7")
    ours.parameters["sequence_end"].bool_param = True
    ours.outputs.add(name="OUTPUT0", datatype="FP32", shape=[1, 10])
    ours.outputs.add(name="LABEL", datatype="BYTES", shape=[1])
    ours.raw_output_contents.extend([bytes(40), b"\x01\x00\x00\x007"])
    stream = pb.ModelStreamInferResponse(error_message="", infer_response=ours)
    theirs = triton_pb.ModelStreamInferResponse.FromString(stream.SerializeToString())
    response = theirs.infer_response
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "req-7")
    assert response.parameters["sequence_end"].bool_param is True
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [
        ("OUTPUT0", "FP32", [1, 10]),
        ("LABEL", "BYTES", [1]),
    ]
    assert list(response.raw_output_contents) == [bytes(40), b"\x01\x00\x00\x007"]
    result = tritonclient.grpc.InferResult(response)
    assert result.as_numpy("LABEL").tolist() == [b"7"]
    assert result.as_numpy("OUTPUT0").shape == (1, 10)
    error = triton_pb.ModelStreamInferResponse.FromString(
        pb.ModelStreamInferResponse(error_message="boom").SerializeToString()
    )
    assert error.error_message == "boom" and not error.HasField("infer_response")


def test_triton_only_fields_survive_our_parsing():
    """A Triton ModelConfig with fields we do not model: ours reads the rest and keeps the unknown."""
    theirs = triton_config_pb.ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=8)
    theirs.input.add(name="INPUT0", data_type=triton_config_pb.TYPE_FP32, dims=[3], is_shape_tensor=True)
    theirs.dynamic_batching.preferred_batch_size.extend([4, 8])
    theirs.optimization.priority = triton_config_pb.ModelOptimizationPolicy.PRIORITY_MAX
    theirs.instance_group.add(kind=triton_config_pb.ModelInstanceGroup.KIND_GPU, count=2, gpus=[0, 1])
    ours = pb.ModelConfig.FromString(theirs.SerializeToString())
    assert (ours.name, ours.platform, ours.max_batch_size) == ("m", "onnxruntime_onnx", 8)
    assert ours.input[0].data_type == pb.TYPE_FP32 and list(ours.input[0].dims) == [3]
    assert list(ours.dynamic_batching.preferred_batch_size) == [4, 8]
    assert ours.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert list(ours.instance_group[0].gpus) == [0, 1]
    assert triton_config_pb.ModelConfig.FromString(ours.SerializeToString()) == theirs


# ------------------------------------------------------------ (c) fresh stubs


def test_generated_stubs_are_fresh():
    assert generate.differing_files() == [], "run: python -m tensorwire.proto.generate"


# ------------------------------------------------------------ (d) the standard descriptor pool


def test_standard_pool_serves_the_standard_service():
    pool = service.standard_descriptor_pool()
    assert pool is not descriptor_pool.Default()
    assert service.standard_descriptor_pool() is pool  # built once
    standard = pool.FindServiceByName(STANDARD_SERVICE)
    assert standard.full_name == STANDARD_SERVICE
    assert {m.name for m in standard.methods} == EXPECTED_METHODS
    messages, enums = reachable(standard)
    assert messages and all(name.startswith("inference.") for name in messages)
    assert all(name.startswith("inference.") for name in enums)
    for method in standard.methods:
        assert method.input_type.full_name.startswith("inference."), method.name
        assert method.output_type.full_name.startswith("inference."), method.name
        ours = OUR_SERVICE.methods_by_name[method.name]
        assert relative(method.input_type.full_name) == relative(ours.input_type.full_name)
        assert relative(method.output_type.full_name) == relative(ours.output_type.full_name)
        assert (method.client_streaming, method.server_streaming) == (
            ours.client_streaming,
            ours.server_streaming,
        )
    # what reflection shows is wire-identical to Triton's too
    for message in messages.values():
        assert_message_matches(message)
    for enum in enums.values():
        assert_enum_matches(enum)


def test_standard_pool_messages_read_our_bytes():
    pool = service.standard_descriptor_pool()
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\x01"])
    request.inputs.add(name="x", datatype="UINT8", shape=[1])
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelInferRequest"))
    parsed = cls.FromString(request.SerializeToString())
    assert as_dict(parsed) == as_dict(request)


def test_standard_pool_leaves_the_default_pool_alone():
    service.standard_descriptor_pool()
    default = descriptor_pool.Default()
    # here tritonclient owns inference.* in the default pool; our renamed file is not there
    assert default.FindServiceByName(STANDARD_SERVICE).file.name == "grpc_service.proto"
    with pytest.raises(KeyError):
        default.FindFileByName("inference/grpc_service.proto")
    # and in a fresh process without tritonclient, the default pool has no inference.* at all
    code = textwrap.dedent(
        """
        from google.protobuf import descriptor_pool
        from tensorwire.proto import service
        service.standard_descriptor_pool().FindServiceByName("inference.GRPCInferenceService")
        try:
            descriptor_pool.Default().FindServiceByName("inference.GRPCInferenceService")
        except KeyError:
            print("untouched")
        import tritonclient.grpc  # still importable afterwards
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["untouched", "ok"]


# ------------------------------------------------------------ (e) METHODS


def test_method_paths_are_standard():
    assert service.SERVICE_NAME == STANDARD_SERVICE
    assert set(service.METHODS) == EXPECTED_METHODS
    for name, method in service.METHODS.items():
        assert method.name == name
        assert method.path == f"/inference.GRPCInferenceService/{name}"
        descriptor = OUR_SERVICE.methods_by_name[name]
        assert method.request.DESCRIPTOR is descriptor.input_type
        assert method.response.DESCRIPTOR is descriptor.output_type
        assert (method.client_streaming, method.server_streaming) == (
            descriptor.client_streaming,
            descriptor.server_streaming,
        )
    assert service.METHODS["ModelInfer"].request is pb.ModelInferRequest
    assert service.METHODS["ModelStreamInfer"].response is pb.ModelStreamInferResponse
    assert (
        service.METHODS["ModelStreamInfer"].client_streaming
        and service.METHODS["ModelStreamInfer"].server_streaming
    )
