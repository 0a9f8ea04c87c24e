"""Datasets for the trainer: scikit-learn's bundled digits, synthetic, ``.npz``, CSV, and token
sequences (pyjokes' jokes, a labelled text file, or integer sequences in ``.npz``).

Everything is loaded into memory as ``float32`` samples and ``int64`` labels and
checked once, up front, so that a bad file fails with one clear line before any
worker process starts. The split into train / validation / test is a pure
function of the data and the seed, so every step (fit, export, quantize, the
end-to-end test) sees the same held-out samples without storing them.
"""

from __future__ import annotations

import csv
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tensorwire.install_hint import install_hint
from tensorwire.trainer.errors import TrainerError
from tensorwire.trainer.text import TEXT_SUFFIXES

BUILTIN = ("digits", "synthetic", "jokes")


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to rebuild the exact same splits later (stored in checkpoints)."""

    data: str = "digits"
    input_shape: tuple[int, ...] | None = None  # reshape each sample (npz/CSV/synthetic)
    num_classes: int | None = None  # None: max label + 1
    num_samples: int = 2048  # synthetic only
    label_column: str = "-1"  # CSV only: an index or a header name
    vocab_size: int = 1000  # text only: BPE vocabulary trained on the training split
    max_length: int = 0  # text only: tokens per sample (0: the longest training text, at most 256)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    name: str
    #: Token data: the vocabulary size (ids 0..vocab_size-1, 0 = padding); 0 for float features.
    vocab_size: int = 0
    #: Token data from text: the trained tokenizer (``tokenizers.Tokenizer``); None otherwise.
    tokenizer: object | None = None
    #: Class names in label order (for text: the label names of the file, or the jokes' languages).
    label_names: tuple[str, ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])

    @property
    def is_image(self) -> bool:
        """Samples shaped (C, H, W): augmentation and CNNs apply."""
        return len(self.sample_shape) == 3 and not self.vocab_size

    @property
    def dtype(self) -> str:
        """The samples' element type: "int64" for token ids, "float32" otherwise."""
        return "int64" if self.vocab_size else "float32"


def _digits_file() -> Path | None:
    """scikit-learn's bundled copy of the UCI digits, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The digits as ``sklearn.datasets.load_digits`` returns them, read straight from its file:
    importing ``sklearn.datasets`` costs ~1.5 s per process (scipy), paid by every DDP worker."""
    path = _digits_file()
    if path is not None:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        pixels, labels = table[:, :-1], table[:, -1]
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise TrainerError(f"data 'digits' needs scikit-learn ({install_hint('train')})") from None
        bunch = load_digits()
        pixels, labels = bunch.data.astype(np.float32), bunch.target
    # Pixels are 0..16; the served model takes [0, 1] (the documented input contract).
    return (pixels / 16.0).reshape(-1, 1, 8, 8), labels.astype(np.int64)


def _synthetic(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    """Learnable noise: each class has a smooth template, samples are template + noise."""
    shape = tuple(spec.input_shape or (3, 32, 32))
    classes = spec.num_classes or 10
    if spec.num_samples < 1:
        raise TrainerError(f"synthetic data needs --num-samples >= 1 (got {spec.num_samples})")
    rng = np.random.default_rng(spec.seed + 7919)
    if len(shape) == 3:  # low-frequency templates, so shifted images keep their class
        c, h, w = shape
        coarse = rng.normal(size=(classes, c, -(-h // 4), -(-w // 4))).astype(np.float32)
        templates = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]
    else:
        templates = rng.normal(size=(classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=spec.num_samples).astype(np.int64)
    x = templates[y] + rng.normal(scale=1.0, size=(spec.num_samples, *shape)).astype(np.float32)
    return x.astype(np.float32), y


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "tokens" in archive.files and "X" not in archive.files:
                if "y" not in archive.files:
                    raise TrainerError(f"{path}: has 'tokens' but no 'y' (labels)")
                return archive["tokens"], archive["y"]
            missing = [k for k in ("X", "y") if k not in archive.files]
            if missing:
                raise TrainerError(
                    f"{path}: missing array(s) {missing}; expected arrays 'X' (samples) and 'y' (labels)"
                )
            return archive["X"], archive["y"]
    except (ValueError, OSError) as err:
        raise TrainerError(f"{path}: not a readable .npz file ({err})") from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    """Numeric CSV, one sample per row; an optional header row; the label in one column."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise TrainerError(f"{path}: empty dataset (no rows)")
    header = None if all(_is_number(cell) for cell in rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header else rows
    if not body:
        raise TrainerError(f"{path}: empty dataset (a header row and no data)")
    width = len(body[0])
    if width < 2:
        raise TrainerError(f"{path}: each row needs at least one feature and a label (found {width} column)")
    if header is not None and label_column in header:
        label_index = header.index(label_column)
    else:
        try:
            label_index = int(label_column)
        except ValueError:
            raise TrainerError(f"{path}: no column named {label_column!r} (header: {header})") from None
        if not -width <= label_index < width:
            raise TrainerError(f"{path}: --label-column {label_index} is outside the {width} columns")
        label_index %= width
    values = np.empty((len(body), width), dtype=np.float64)
    for number, row in enumerate(body, start=2 if header else 1):
        if len(row) != width:
            raise TrainerError(f"{path}: line {number} has {len(row)} fields, expected {width} (mismatched shapes)")
        try:
            values[number - (2 if header else 1)] = [float(cell) for cell in row]
        except ValueError:
            raise TrainerError(f"{path}: line {number} has a non-numeric field") from None
    features = np.delete(values, label_index, axis=1).astype(np.float32)
    return features, values[:, label_index]


def _labels(y: np.ndarray, where: str, num_classes: int | None) -> tuple[np.ndarray, int]:
    y = np.asarray(y)
    if y.ndim != 1:
        raise TrainerError(f"{where}: labels must be one-dimensional class indices (got shape {list(y.shape)})")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise TrainerError(f"{where}: labels must be whole numbers 0..K-1 (found a non-integer label)")
    elif y.dtype.kind not in "iub":
        raise TrainerError(f"{where}: labels must be integer class indices (got dtype {y.dtype})")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise TrainerError(f"{where}: label {int(y.min())} out of range; labels must be 0..K-1")
    classes = int(y.max()) + 1 if num_classes is None else num_classes
    if y.max() >= classes:
        raise TrainerError(
            f"{where}: label {int(y.max())} out of range for --num-classes {classes} (labels must be 0..{classes - 1})"
        )
    if classes < 2:
        raise TrainerError(f"{where}: a classifier needs at least 2 classes (labels are all {int(y.max())})")
    return y, classes


def _is_text(spec: DataSpec) -> bool:
    return spec.data == "jokes" or Path(spec.data).suffix.lower() in TEXT_SUFFIXES


def _check_tokens(x: np.ndarray, where: str) -> int:
    """Integer token ids (N, L), 0 = padding; returns the vocabulary size (largest id + 1)."""
    if x.ndim != 2 or x.dtype.kind not in "iu":
        raise TrainerError(
            f"{where}: 'tokens' must be integer token ids shaped (samples, length), got {x.dtype} {list(x.shape)}"
        )
    if x.size and x.min() < 0:
        raise TrainerError(f"{where}: 'tokens' has negative ids; ids are 0..V-1 with 0 = padding")
    return int(x.max()) + 1 if x.size else 1


def _load_text(spec: DataSpec) -> Splits:
    """Text: split first, train the tokenizer on the training texts only, then encode every split."""
    from tensorwire.trainer import text

    if spec.data == "jokes":
        texts, labels, names = text.jokes_corpus()
        name = "jokes"
    else:
        path = Path(spec.data)
        if not path.is_file():
            raise TrainerError(f"{path}: no such file")
        texts, labels, names = text.read_labelled_text(path)
        name = path.name
    where = name if spec.data == "jokes" else str(spec.data)
    y, classes = _labels(labels, where, spec.num_classes)
    train, val, test = _split_indices(y, spec.val_fraction, spec.test_fraction, spec.seed)
    for label, idx in (("training", train), ("validation", val), ("test", test)):
        if len(idx) == 0:
            raise TrainerError(f"{name}: too few samples ({len(y)}) for a non-empty {label} split")
    train_texts = [texts[i] for i in train]
    tokenizer = text.train_tokenizer(train_texts, spec.vocab_size)
    if spec.max_length < 0:
        raise TrainerError(f"--max-length must not be negative (got {spec.max_length})")
    length = spec.max_length or int(min(256, max(2, text.lengths(tokenizer, train_texts).max())))
    parts = [Split(text.encode(tokenizer, [texts[i] for i in idx], length), y[idx]) for idx in (train, val, test)]
    names = tuple(names) + tuple(str(i) for i in range(len(names), classes))
    return Splits(*parts, classes, name, tokenizer.get_vocab_size(), tokenizer, names[:classes])


def load(spec: DataSpec) -> tuple[np.ndarray, np.ndarray, int, str]:
    """Samples (float32, N x sample_shape), labels (int64), class count and a display name."""
    if spec.data == "digits":
        x, y = _digits()
        name = "digits"
    elif spec.data == "synthetic":
        x, y = _synthetic(spec)
        name = f"synthetic{list(x.shape[1:])}"
    else:
        path = Path(spec.data)
        if path.suffix.lower() not in (".npz", ".csv"):
            raise TrainerError(
                f"unknown data {spec.data!r}: use 'digits', 'synthetic', 'jokes', or a path to a "
                ".npz, .csv, .tsv or .txt file"
            )
        if not path.is_file():
            raise TrainerError(f"{path}: no such file")
        x, y = _npz(path) if path.suffix.lower() == ".npz" else _csv(path, spec.label_column)
        name = path.name
    where = name if spec.data in BUILTIN else str(spec.data)
    x = np.asarray(x)
    if len(x) == 0 or np.asarray(y).size == 0:
        raise TrainerError(f"{where}: empty dataset (0 samples)")
    if x.ndim < 2:
        raise TrainerError(
            f"{where}: X must have a sample dimension and at least one feature (got shape {list(x.shape)})"
        )
    if len(x) != len(y):
        raise TrainerError(f"{where}: mismatched shapes: X has {len(x)} samples but y has {len(y)} labels")
    if x.dtype.kind not in "fiub":
        raise TrainerError(f"{where}: X must be numeric (got dtype {x.dtype})")
    if spec.data not in BUILTIN and _is_token_npz(Path(spec.data)):
        _check_tokens(x, where)
        y, classes = _labels(y, where, spec.num_classes)
        return np.ascontiguousarray(x.astype(np.int64)), y, classes, name
    x = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x)):
        raise TrainerError(f"{where}: X contains NaN or infinite values")
    if spec.input_shape is not None and spec.data != "synthetic":
        want = tuple(spec.input_shape)
        if int(np.prod(want)) != int(np.prod(x.shape[1:])):
            raise TrainerError(
                f"{where}: mismatched shapes: samples have {int(np.prod(x.shape[1:]))} values "
                f"({list(x.shape[1:])}), --input-shape {list(want)} needs {int(np.prod(want))}"
            )
        x = x.reshape(len(x), *want)
    y, classes = _labels(y, where, spec.num_classes)
    return np.ascontiguousarray(x), y, classes, name


def _split_indices(y: np.ndarray, val: float, test: float, seed: int) -> tuple[np.ndarray, ...]:
    """A stratified split: each class contributes the same fractions to val and test."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(len(members) * test))
        n_val = int(round(len(members) * val))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)


def _is_token_npz(path: Path) -> bool:
    """A ``.npz`` holding integer sequences under ``tokens`` (rather than features under ``X``)."""
    if path.suffix.lower() != ".npz":
        return False
    with np.load(path, allow_pickle=False) as archive:
        return "tokens" in archive.files and "X" not in archive.files


def load_splits(spec: DataSpec) -> Splits:
    """Load, validate and split; fails with one line if a split would be empty.

    Float features come back as float32 samples; token data (``jokes``, ``.tsv``/``.txt`` text,
    ``.npz`` with ``tokens``) as int64 ids shaped (N, L), right-padded with 0, with
    ``Splits.vocab_size`` set.
    """
    for label, fraction in (("--val-fraction", spec.val_fraction), ("--test-fraction", spec.test_fraction)):
        if not 0 < fraction < 1:
            raise TrainerError(f"{label} must be between 0 and 1 (got {fraction})")
    if spec.val_fraction + spec.test_fraction >= 1:
        raise TrainerError("--val-fraction + --test-fraction must leave samples for training")
    if _is_text(spec):
        return _load_text(spec)
    x, y, classes, name = load(spec)
    vocab = _check_tokens(x, str(spec.data)) if x.dtype == np.int64 else 0
    train, val, test = _split_indices(y, spec.val_fraction, spec.test_fraction, spec.seed)
    for label, idx in (("training", train), ("validation", val), ("test", test)):
        if len(idx) == 0:
            raise TrainerError(f"{name}: too few samples ({len(y)}) for a non-empty {label} split")
    return Splits(
        Split(x[train], y[train]), Split(x[val], y[val]), Split(x[test], y[test]), classes, name, vocab_size=vocab
    )
