"""The options of each trainer step (flags, TOML keys and defaults in one place)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from tensorwire.trainer.data import DataSpec
from tensorwire.trainer.options import opt

RUN_HELP = "run folder: checkpoints, metrics log, exported models and reports"


@dataclass
class LaunchOptions:
    """How a DDP job starts (torchrun's elastic launcher options) and runs: fit's, prune's and distill's."""

    nproc_per_node: int = opt(1, "worker processes on this machine (one per GPU on GPUs)", kind="int")
    nnodes: str = opt("1", "number of machines, or MIN:MAX for elastic jobs", metavar="N")
    node_rank: int = opt(-1, "this machine's rank, with a static rendezvous at --rdzv-endpoint", kind="int")
    rdzv_endpoint: str = opt("", "HOST:PORT of the rendezvous (needed when --nnodes > 1)")
    rdzv_id: str = opt("tensorwire", "job id shared by all machines of one run")
    device: str = opt("auto", "where to train; auto = CUDA if present", choices=("auto", "cpu", "cuda"))
    threads_per_rank: int = opt(1, "CPU threads per worker process", kind="int")
    bf16: bool = opt(True, "bf16 autocast on GPU", kind="bool")
    timeout: float = opt(300.0, "seconds before a stuck collective or rendezvous fails the job", kind="float")
    progress: bool = opt(True, "progress bar on rank 0 (only on a terminal)", kind="bool")


@dataclass
class FitOptions(LaunchOptions):
    # data
    data: str = opt(
        "digits",
        "'digits', 'synthetic', 'jokes' (pyjokes' jokes: which language), a .npz (arrays X, y; or tokens, y) "
        "/ .csv file, or a .tsv/.txt text file of 'label<TAB>text' lines",
        metavar="SOURCE",
    )
    input_shape: list[int] = opt(
        [],
        "reshape each sample, e.g. 1,8,8 (synthetic: the sample shape, default 3,32,32)",
        kind="ints",
        metavar="C,H,W",
    )
    num_classes: int = opt(0, "number of classes (default: largest label + 1; synthetic: 10)", kind="int")
    num_samples: int = opt(2048, "synthetic data: number of samples", kind="int")
    label_column: str = opt("-1", "CSV: the label column, an index or a header name")
    vocab_size: int = opt(1000, "text data: BPE vocabulary size, trained on the training split", kind="int")
    max_length: int = opt(
        0, "text data: tokens per sample, longer texts are cut (default: the longest, at most 256)", kind="int"
    )
    val_fraction: float = opt(0.15, "fraction held out for validation (early stopping)", kind="float")
    test_fraction: float = opt(0.15, "fraction held out for the final accuracy reports", kind="float")
    seed: int = opt(0, "seed for the split, initialization, shuffling and augmentation", kind="int")
    # model
    model: str = opt("cnn", "'mlp', 'cnn' (small ResNet), 'transformer', or 'package.module:factory'")
    model_args: dict = opt({}, "a model option, e.g. width=16 or hidden=[512,256] (repeatable)", kind="kv")
    dropout: float = opt(0.1, "dropout probability in built-in models", kind="float")
    standardize: bool = opt(
        False, "standardize features with training-split statistics, baked into the model", kind="bool"
    )
    # optimization
    optimizer: str = opt("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float = opt(0.0, "peak learning rate (default: 3e-3 for adamw, 0.05 for sgd)", kind="float")
    momentum: float = opt(0.9, "SGD momentum (Nesterov)", kind="float")
    l2: float = opt(1e-4, "L2 regularization (weight decay; decoupled for adamw)", kind="float")
    l1: float = opt(0.0, "L1 regularization: adds l1 * sum|w| over weights to the loss", kind="float")
    lr_schedule: str = opt("cosine", "learning-rate schedule", choices=("cosine", "onecycle", "step", "constant"))
    epochs: int = opt(20, "maximum number of epochs", kind="int")
    batch_size: int = opt(64, "global batch size, split across all processes", kind="int")
    augment: str = opt(
        "auto",
        "image augmentation; auto = shift for image data, none otherwise",
        choices=("auto", "none", "shift", "flip", "shift+flip"),
    )
    max_shift: int = opt(0, "largest random shift in pixels (default: image height / 8, at least 1)", kind="int")
    patience: int = opt(5, "early stopping: epochs without validation improvement (0 = off)", kind="int")
    # run folder
    run: str = opt("runs/latest", RUN_HELP, metavar="DIR")
    resume: bool = opt(False, "continue from the run folder's last checkpoint", kind="bool")
    overwrite: bool = opt(False, "start afresh even if the run folder has a checkpoint", kind="bool")
    stop_after_epochs: int = opt(
        0,
        "stop after this many epochs of this invocation, as if interrupted (resume later with --resume)",
        kind="int",
    )

    def data_spec(self) -> DataSpec:
        return data_spec_from(asdict(self))


def data_spec_from(config: dict) -> DataSpec:
    """The data part of a (stored) fit configuration."""
    return DataSpec(
        data=config["data"],
        input_shape=tuple(config["input_shape"]) or None,
        num_classes=config["num_classes"] or None,
        num_samples=config["num_samples"],
        label_column=str(config["label_column"]),
        vocab_size=int(config.get("vocab_size", 1000)),
        max_length=int(config.get("max_length", 0)),
        val_fraction=config["val_fraction"],
        test_fraction=config["test_fraction"],
        seed=config["seed"],
    )


#: Options that may differ when resuming (the rest must match the checkpoint). Not ``epochs``:
#: the learning-rate schedule was planned for it (OneCycleLR even refuses to step past its end).
RESUMABLE = frozenset(
    {
        "patience",
        "resume",
        "overwrite",
        "stop_after_epochs",
        "progress",
        "nproc_per_node",
        "nnodes",
        "node_rank",
        "rdzv_endpoint",
        "rdzv_id",
        "device",
        "threads_per_rank",
        "timeout",
        "run",
    }
)


@dataclass
class ExportOptions:
    run: str = opt("runs/latest", RUN_HELP, metavar="DIR")
    checkpoint: str = opt("", "checkpoint to export (default: the run's best.pt)", metavar="FILE")
    formats: list[str] = opt(
        ["onnx", "torchscript"],
        "formats to write: onnx, torchscript, pt2 (torch.export program), aoti (AOTInductor package, "
        "compiled with the machine's C++ compiler)",
        kind="strs",
        metavar="onnx,torchscript,pt2,aoti",
    )
    verify_batch_sizes: list[int] = opt(
        [1, 7, 64], "random batch sizes checked against the eager model", kind="ints", metavar="N,N,..."
    )
    tolerance: float = opt(1e-3, "largest allowed max abs difference from the eager model's logits", kind="float")


@dataclass
class QuantizeOptions:
    run: str = opt("runs/latest", RUN_HELP, metavar="DIR")
    mode: str = opt(
        "auto",
        "static = QDQ with calibration; dynamic = weights only, for Linear-heavy models "
        "(never applied to convolutions); auto = static",
        choices=("auto", "static", "dynamic"),
    )
    calibration_samples: int = opt(256, "training samples used to calibrate activation ranges", kind="int")
    per_channel: bool = opt(True, "per-channel weight scales", kind="bool")
    reduce_range: bool = opt(
        True,
        "7-bit weights: exact integer arithmetic on CPUs without VNNI (AVX2 and older), where 8-bit weights "
        "can overflow ONNX Runtime's 16-bit pair sums and lose accuracy only there",
        kind="bool",
    )
    max_accuracy_drop: float = opt(
        1.0, "largest FP32 -> INT8 accuracy drop, in points, that may be published", kind="float"
    )


@dataclass
class PublishOptions:
    run: str = opt("runs/latest", RUN_HELP, metavar="DIR")
    repo: str = opt("models", "model repository to write into", metavar="DIR")
    name: str = opt(
        "",
        "model name (default: <data>_<model>, plus _int8 or _ts for those formats; "
        "train adds these suffixes to a given name too)",
    )
    format: str = opt("onnx", "artifact to publish", choices=("onnx", "int8", "torchscript", "pt2", "aoti"))
    version: int = opt(0, "version number (default: the next free one)", kind="int")
    max_batch_size: int = opt(64, "largest batch the server forms or accepts", kind="int")
    max_queue_delay_us: int = opt(500, "dynamic batching: the most a request waits for companions", kind="int")
    preferred_batch_sizes: list[int] = opt([16, 32], "dynamic batching: batch sizes worth waiting for", kind="ints")
    instances: int = opt(1, "replicas per device (instance_group count)", kind="int")
    instance_kind: str = opt("auto", "instance_group kind", choices=("auto", "cpu", "gpu"))
    max_accuracy_drop: float = opt(
        1.0, "largest FP32 -> INT8 accuracy drop, in points, that may be published", kind="float"
    )
    force: bool = opt(False, "publish even if INT8 accuracy dropped more than --max-accuracy-drop", kind="bool")


@dataclass
class TrainOptions:
    """Only what ``train`` adds to the four steps' options."""

    publish_formats: list[str] = opt(
        ["onnx", "int8", "torchscript"],
        "artifacts to publish (names get _int8, _ts, _pt2, _aoti)",
        kind="strs",
        metavar="onnx,int8,torchscript,pt2,aoti",
    )


#: The launcher options that prune and distill take as fit does.
LAUNCH_FIELDS = tuple(f.name for f in fields(LaunchOptions))


@dataclass
class PruneOptions(LaunchOptions):
    source: str = opt("", "run folder of the trained model to prune (its best.pt); required", metavar="DIR")
    run: str = opt("runs/pruned", "run folder for the pruned model (a normal run folder)", metavar="DIR")
    overwrite: bool = opt(False, "replace a run folder that already holds a checkpoint", kind="bool")
    method: str = opt(
        "structured",
        "structured = remove whole channels / hidden units (dense kernels get faster); unstructured = zero "
        "the smallest weights (fewer non-zeros, same size and speed on dense CPU kernels)",
        choices=("structured", "unstructured"),
    )
    target: str = opt(
        "params",
        "what --keep measures: parameters or FLOPs (multiply-accumulates at batch 1)",
        choices=("params", "flops"),
    )
    keep: float = opt(0.5, "fraction of the parent's parameters (or FLOPs) to keep, in (0, 1)", kind="float")
    steps: int = opt(2, "iterative rounds of prune -> fine-tune, each removing an equal share", kind="int")
    finetune_epochs: int = opt(3, "DDP fine-tuning epochs after each pruning round", kind="int")
    importance: str = opt(
        "l2", "channel importance: L2 or L1 norm of each channel's weights (group-wise)", choices=("l2", "l1")
    )
    round_to: int = opt(
        4, "structured: keep channel counts multiples of this (vector-friendly kernels; 1 = any)", kind="int"
    )
    lr: float = opt(0.0, "fine-tuning learning rate (default: a tenth of the parent's)", kind="float")
    batch_size: int = opt(0, "global fine-tuning batch (default: the parent's)", kind="int")


@dataclass
class DistillOptions:
    teacher: str = opt("", "run folder of the teacher model (its best.pt); required", metavar="DIR")
    temperature: float = opt(4.0, "softmax temperature of the soft targets (T)", kind="float")
    alpha: float = opt(
        0.7, "weight of the soft-target loss; 1 - alpha weighs the hard-label cross-entropy", kind="float"
    )
