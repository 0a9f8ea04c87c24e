"""Benchmark reference models, written into a model repository.

    python -m tensorwire.loadtest.reference_models --repo bench_models

writes, each as ``<repo>/<name>/config.toml`` + ``<repo>/<name>/1/model.onnx``:

``identity``   FP32 [-1, 16] -> Identity. Pure serving overhead: no compute at all.
``cnn``        FP32 [-1, 3, 32, 32] -> 10 logits. A small ResNet (3 stages of basic residual
               blocks, 16/32/64 channels), about 60 MFLOPs (2 x multiply-accumulates) per sample.
               Compute-bound; batching gains little on CPU.
``wide_mlp``   FP32 [-1, 512] -> [-1, 512] through 4096 -> 4096 (about 21 M parameters, 84 MB).
               Memory-bound at batch 1; batching gains a lot (the weights are read once per batch).

Every model has ``max_batch_size = 64``, random weights from a fixed seed, input ``INPUT0`` and
output ``OUTPUT0``. With ``--variants batched,nobatch`` (the default) each also gets a
``<name>_nobatch`` twin that shares its model file (a hard link) and has
``dynamic_batching.enabled = false``: same shapes, same clients, no server-side batching.
CPU replicas x intra-op threads per model: ``--instances cnn=2x1`` (defaults in ``DEFAULT_INSTANCES``).

For each model a ``perf_analyzer --input-data`` file with real, finite, seeded samples goes to
``<repo>/../perf_inputs/<name>.json`` (``--inputs-dir`` to change): perf_analyzer's default random
data overflows the CNN to inf/NaN.

The CNN is built with torch and exported with ``torch.onnx.export`` (dynamo exporter, dynamic batch
1..64, one file). The identity and the MLP are written directly with ``onnx.helper``, so building them
needs neither torch nor onnxscript.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tensorwire.repository import (
    DynamicBatching,
    InstanceGroup,
    ModelConfigFile,
    TensorSpec,
    write_model_config,
)

MODELS = ("identity", "cnn", "wide_mlp")
VARIANTS = ("batched", "nobatch")
NOBATCH_SUFFIX = "_nobatch"
MAX_BATCH = 64
SEED = 0
OPSET = 17  # for the onnx.helper graphs (the torch exporter picks its own)

#: per model: input dims without the batch dimension, output dims without it
SHAPES: dict[str, tuple[list[int], list[int]]] = {
    "identity": ([16], [16]),
    "cnn": ([3, 32, 32], [10]),
    "wide_mlp": ([512], [512]),
}
CNN_WIDTHS = (16, 32, 64)
CNN_BLOCKS = (3, 2, 2)
MLP_SIZES = (512, 4096, 4096, 512)

#: CPU replicas x intra-op threads per model, chosen from the in-process ceiling on 2 cores
#: (see .notes/perf.md): the CNN scales with replicas (batching barely helps it, and 2 x 1 thread
#: beats 1 x 2 threads at small batches); the MLP is memory-bound, gains 10x from batching, and one
#: 2-thread replica halves a big batch's latency for the same throughput. Identity: 1 x 1.
DEFAULT_INSTANCES: dict[str, tuple[int, int]] = {"identity": (1, 1), "cnn": (2, 1), "wide_mlp": (1, 2)}


@dataclass
class BuiltModel:
    name: str
    path: Path
    config: ModelConfigFile
    inputs_json: Path | None
    flops: int  # per sample, 2 x multiply-accumulates of the conv/linear layers
    params: int


# --------------------------------------------------------------------------- configs


def make_config(
    model: str,
    *,
    batching: bool = True,
    replicas: int = 1,
    threads: int | None = None,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: Sequence[int] = (),
    metadata: dict[str, str] | None = None,
) -> ModelConfigFile:
    """The config.toml contents for one reference model (validated by the shared schema)."""
    in_dims, out_dims = SHAPES[model]
    return ModelConfigFile(
        backend="onnxruntime",
        max_batch_size=MAX_BATCH,
        inputs=[TensorSpec(name="INPUT0", datatype="FP32", dims=in_dims)],
        outputs=[TensorSpec(name="OUTPUT0", datatype="FP32", dims=out_dims)],
        dynamic_batching=DynamicBatching(
            enabled=batching,
            max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=list(preferred_batch_sizes) if batching else [],
        ),
        instance_group=[InstanceGroup(kind="cpu", count=replicas, threads=threads)],
        metadata=metadata or {},
    )


# --------------------------------------------------------------------------- model files


def _save_onnx(model: Any, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)


def build_identity(path: Path, seed: int = SEED) -> tuple[int, int]:
    """OUTPUT0 = INPUT0 on FP32 [batch, 16]. Returns (flops, params) per sample: (0, 0)."""
    from onnx import TensorProto, helper

    shape = ["batch", *SHAPES["identity"][0]]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    _save_onnx(model, path)
    return 0, 0


def mlp_flops_params(sizes: Sequence[int] = MLP_SIZES) -> tuple[int, int]:
    """(FLOPs per sample, parameters) of a stack of fully connected layers."""
    macs = sum(a * b for a, b in zip(sizes, sizes[1:], strict=False))
    params = macs + sum(sizes[1:])
    return 2 * macs, params


def build_wide_mlp(path: Path, seed: int = SEED, sizes: Sequence[int] = MLP_SIZES) -> tuple[int, int]:
    """512 -> 4096 -> 4096 -> 512 with ReLU between (Gemm nodes), He-initialized from ``seed``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "INPUT0"
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        last = i == len(sizes) - 2
        weight = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        weight *= np.float32(np.sqrt((1.0 if last else 2.0) / fan_in))
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        initializers += [numpy_helper.from_array(weight, f"fc{i}.weight"), numpy_helper.from_array(bias, f"fc{i}.bias")]
        gemm_out = "OUTPUT0" if last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"]))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "wide_mlp",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    _save_onnx(model, path)
    return mlp_flops_params(sizes)


def make_cnn(seed: int = SEED, widths: Sequence[int] = CNN_WIDTHS, blocks: Sequence[int] = CNN_BLOCKS):
    """A ResNet-style CNN for 3x32x32 images: stem, basic residual blocks in stages, pool, linear."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Identity()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    class ResNetCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
            )
            layers, c_in = [], widths[0]
            for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
                for b in range(count):
                    layers.append(BasicBlock(c_in, width, 2 if stage > 0 and b == 0 else 1))
                    c_in = width
            self.blocks = nn.Sequential(*layers)
            self.head = nn.Linear(c_in, 10)

        def forward(self, x):
            x = self.blocks(self.stem(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = ResNetCNN()
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    # Random but tame statistics, so the exported BatchNorms are not identities.
                    module.running_mean.uniform_(-0.1, 0.1)
                    module.running_var.uniform_(0.8, 1.2)
                    module.bias.uniform_(-0.1, 0.1)
            for block in model.blocks:
                block.bn2.weight.fill_(0.5)  # keep the residual sum's variance from doubling per block
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def count_conv_linear_macs(model: Any, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates per sample of every Conv2d and Linear, from the shapes of one forward pass."""
    import torch
    from torch import nn

    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * k_h * k_w
        elif isinstance(module, nn.Linear):
            total += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    finally:
        for h in handles:
            h.remove()
    return total


def build_cnn(path: Path, seed: int = SEED, check: bool = True) -> tuple[int, int]:
    """Export the CNN to ONNX (dynamic batch 1..64, one file); returns (flops, params) per sample."""
    import torch
    from torch.export import Dim

    model = make_cnn(seed)
    in_dims = SHAPES["cnn"][0]
    flops = 2 * count_conv_linear_macs(model, in_dims)
    params = sum(p.numel() for p in model.parameters())
    example = torch.from_numpy(sample_inputs("cnn", 4, seed))  # batch >= 2: no 0/1 specialization
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    # The exporter logs that torchvision's ops are unavailable and emits pytree FutureWarnings: noise here.
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=True,
                external_data=False,
                verbose=False,
                input_names=["INPUT0"],
                output_names=["OUTPUT0"],
                dynamic_shapes={"x": {0: Dim("batch", min=1, max=MAX_BATCH)}},
            )
    finally:
        registration_log.setLevel(level)
    if check:
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        for batch in (1, 3, MAX_BATCH):
            x = sample_inputs("cnn", batch, seed + batch)
            with torch.no_grad():
                expected = model(torch.from_numpy(x)).numpy()
            (got,) = session.run(["OUTPUT0"], {"INPUT0": x})
            diff = float(np.abs(got - expected).max())
            if not np.isfinite(got).all() or diff > 1e-3:
                raise RuntimeError(f"exported CNN differs from eager at batch {batch}: max abs diff {diff}")
    os.replace(tmp, path)
    return flops, params


BUILDERS = {"identity": build_identity, "cnn": build_cnn, "wide_mlp": build_wide_mlp}


# --------------------------------------------------------------------------- perf_analyzer inputs


def sample_inputs(model: str, batch: int, seed: int = SEED) -> np.ndarray:
    """Finite, seeded FP32 samples for a model's INPUT0: standard normal, clipped to [-3, 3]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *SHAPES[model][0]), dtype=np.float32)
    return np.clip(x, -3, 3, out=x)


def perf_input_data(model: str, samples: int = 8, seed: int = SEED) -> dict[str, Any]:
    """perf_analyzer's ``--input-data`` JSON: one entry per sample, flat row-major content.

    For a batched model perf_analyzer's ``shape`` excludes the batch dimension; with ``-b N`` it
    repeats entries to fill the batch.
    """
    x = sample_inputs(model, samples, seed)
    dims = SHAPES[model][0]
    return {"data": [{"INPUT0": {"content": np.round(row.ravel(), 4).tolist(), "shape": list(dims)}} for row in x]}


def write_perf_inputs(model: str, path: Path, samples: int = 8, seed: int = SEED) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(perf_input_data(model, samples, seed), separators=(",", ":")))
    return path


def load_perf_inputs(path: Path) -> np.ndarray:
    """The samples of a perf_analyzer input file, stacked as one FP32 batch."""
    data = json.loads(Path(path).read_text())["data"]
    return np.stack([np.asarray(e["INPUT0"]["content"], dtype=np.float32).reshape(e["INPUT0"]["shape"]) for e in data])


# --------------------------------------------------------------------------- repository


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to ``src`` (a copy where links cannot cross file systems)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def build_repository(
    repo: Path,
    models: Sequence[str] = MODELS,
    variants: Sequence[str] = VARIANTS,
    inputs_dir: Path | None = None,
    instances: dict[str, tuple[int, int]] | None = None,
    max_queue_delay_us: int = 100,
    preferred_batch_sizes: Sequence[int] = (),
    seed: int = SEED,
    log=print,
) -> list[BuiltModel]:
    """Write the chosen reference models (and their no-batching twins) and perf input files."""
    repo = Path(repo)
    inputs_dir = Path(inputs_dir) if inputs_dir is not None else repo.resolve().parent / "perf_inputs"
    unknown = set(models) - set(MODELS) or set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown model or variant {sorted(unknown)}; choose from {MODELS} and {VARIANTS}")
    built = []
    for model in models:
        started = time.perf_counter()
        source = repo / model / "1" / "model.onnx"
        if "batched" not in variants:
            source = repo / (model + NOBATCH_SUFFIX) / "1" / "model.onnx"
        flops, params = BUILDERS[model](source, seed=seed)
        replicas, threads = {**DEFAULT_INSTANCES, **(instances or {})}[model]
        metadata = {
            "description": f"tensorwire benchmark reference model '{model}' (random weights, seed {seed})",
            "flops_per_sample": str(flops),
            "parameters": str(params),
            "source": "tensorwire.loadtest.reference_models",
        }
        for variant in variants:
            name = model if variant == "batched" else model + NOBATCH_SUFFIX
            path = repo / name / "1" / "model.onnx"
            if path != source:
                link_or_copy(source, path)
            config = make_config(
                model,
                batching=variant == "batched",
                replicas=replicas,
                threads=threads,
                max_queue_delay_us=max_queue_delay_us,
                preferred_batch_sizes=[p for p in preferred_batch_sizes if p <= MAX_BATCH],
                metadata=metadata,
            )
            write_model_config(config, repo / name)
            inputs_json = write_perf_inputs(model, inputs_dir / f"{name}.json", seed=seed)
            built.append(BuiltModel(name, path, config, inputs_json, flops, params))
        log(
            f"{model:<9} {flops / 1e6:7.2f} MFLOPs/sample ({flops / 2e6:.2f} M MACs, conv/linear), "
            f"{params / 1e6:6.2f} M params, {source.stat().st_size / 1e6:6.1f} MB, "
            f"built in {time.perf_counter() - started:.1f}s"
        )
    return built


def _instances(text: str) -> tuple[str, tuple[int, int]]:
    try:
        model, spec = text.split("=")
        replicas, threads = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--instances wants MODEL=RxT, e.g. cnn=2x1; got {text!r}") from None
    if model not in MODELS or replicas < 1 or threads < 1:
        raise argparse.ArgumentTypeError(f"--instances {text!r}: model one of {MODELS}, R and T >= 1")
    return model, (replicas, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tensorwire.loadtest.reference_models",
        description="Build the benchmark reference models (identity, cnn, wide_mlp) into a model repository.",
    )
    parser.add_argument("--repo", type=Path, required=True, help="model repository folder to write into")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="batched: dynamic batching on (the plain name); nobatch: '<name>_nobatch' with batching off",
    )
    parser.add_argument(
        "--inputs-dir",
        type=Path,
        default=None,
        help="where perf_analyzer input JSON files go (default: <repo>/../perf_inputs)",
    )
    defaults = ", ".join(f"{m}={r}x{t}" for m, (r, t) in DEFAULT_INSTANCES.items())
    parser.add_argument(
        "--instances",
        action="append",
        default=[],
        metavar="MODEL=RxT",
        type=_instances,
        help=f"CPU replicas x intra-op threads for a model, e.g. cnn=1x2 (repeatable; "
        f"defaults: {defaults}; keep R x T <= cores)",
    )
    parser.add_argument("--max-queue-delay-us", type=int, default=100)
    parser.add_argument("--preferred-batch-sizes", default="", help="comma-separated, e.g. 16,32")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    split = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    try:
        built = build_repository(
            args.repo,
            split(args.models),
            split(args.variants),
            args.inputs_dir,
            instances=dict(args.instances),
            max_queue_delay_us=args.max_queue_delay_us,
            preferred_batch_sizes=[int(p) for p in split(args.preferred_batch_sizes)],
            seed=args.seed,
        )
    except ValueError as err:
        parser.error(str(err))
    for model in built:
        print(f"wrote {model.path.parent.parent}  (perf inputs: {model.inputs_json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
