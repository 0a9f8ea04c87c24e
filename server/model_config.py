"""Triton's ``ModelConfig`` message for a served version, as the ModelConfig RPC and HTTP ``.../config`` return it.

The message is the one Triton's clients read (perf_analyzer refuses to start without it): the configuration
as served (``config.toml`` or ``config.pbtxt`` with what the model file completed) and the resolved tensor
signature. Both front-ends return the same message, the HTTP one as JSON with Triton's snake_case names.
"""

from __future__ import annotations

from tensorwire.proto import inference_pb2 as pb
from tensorwire.proto.codec import DATATYPES
from tensorwire.repository import ModelConfigFile
from tensorwire.server.engine import ServedVersion

#: v2 datatype -> Triton's DataType enum value (BYTES is TYPE_STRING there)
CONFIG_TYPES = {name: getattr(pb, f"TYPE_{'STRING' if name == 'BYTES' else name}") for name in DATATYPES}
_KINDS = {
    "cpu": pb.ModelInstanceGroup.KIND_CPU,
    "gpu": pb.ModelInstanceGroup.KIND_GPU,
    "auto": pb.ModelInstanceGroup.KIND_AUTO,
}


def _reshape(config: ModelConfigFile, name: str) -> pb.ModelTensorReshape | None:
    """Triton's reshape of a tensor, when the configuration gives one (the model file's shape)."""
    spec = config.tensor_spec(name)
    return pb.ModelTensorReshape(shape=spec.reshape) if spec is not None and spec.reshape is not None else None


def model_config_proto(version: ServedVersion) -> pb.ModelConfig:
    """Triton's ModelConfig subset for ``version``, filled from its configuration and resolved signature.

    ``dims`` exclude the batch dimension (Triton's convention); ``dynamic_batching`` is present only when the
    model batches; ``[metadata]`` entries become string ``parameters``.
    """
    config, sig = version.config, version.signature
    policy = config.version_policy
    if policy.latest is not None:
        version_policy = pb.ModelVersionPolicy(latest=pb.ModelVersionPolicy.Latest(num_versions=policy.latest))
    elif policy.all:
        version_policy = pb.ModelVersionPolicy(all=pb.ModelVersionPolicy.All())
    else:
        version_policy = pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=policy.specific))
    message = pb.ModelConfig(
        name=version.name,
        platform=config.platform,
        backend=config.backend,
        version_policy=version_policy,
        max_batch_size=config.max_batch_size,
        input=[
            pb.ModelInput(
                name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.dims, reshape=_reshape(config, t.name)
            )
            for t in sig.inputs
        ],
        output=[
            pb.ModelOutput(
                name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.dims, reshape=_reshape(config, t.name)
            )
            for t in sig.outputs
        ],
        instance_group=[
            pb.ModelInstanceGroup(name=f"{version.name}_{i}", kind=_KINDS[g.kind], count=g.count, gpus=g.gpus or [])
            for i, g in enumerate(config.instance_group)
        ],
        default_model_filename=config.model_filename,
        parameters={k: pb.ModelParameter(string_value=v) for k, v in config.metadata.items()},
    )
    if config.batching:
        b = config.dynamic_batching
        message.dynamic_batching.CopyFrom(
            pb.ModelDynamicBatching(
                preferred_batch_size=b.preferred_batch_sizes,
                max_queue_delay_microseconds=b.max_queue_delay_us,
                priority_levels=b.priority_levels,
                default_priority_level=b.default_priority_level,
                default_queue_policy=pb.ModelQueuePolicy(
                    default_timeout_microseconds=b.default_timeout_us,
                    max_queue_size=b.max_queue_size,
                    allow_timeout_override=True,
                ),
            )
        )
    return message
