"""Labelled text for sequence classification, tokenized with a BPE tokenizer trained on the data.

Sources:

* ``jokes``: the one-line jokes that the ``pyjokes`` wheel ships (real, human-written sentences
  in 14 languages); the task is *which language is this joke in*, over the languages with at
  least :data:`JOKES_MIN_PER_LANGUAGE` jokes. Nothing is downloaded.
* a ``.tsv`` / ``.txt`` file: one sample per line, ``label<TAB>text`` (labels are class
  indices 0..K-1 or names; names are numbered in sorted order).

The tokenizer is HuggingFace ``tokenizers``' byte-pair encoding, trained on the *training* split
only (so no test text leaks into the vocabulary), with NFKC normalization, lower-casing and
whitespace/punctuation pre-tokenization. Training is deterministic for the same texts and
vocabulary size, so every process (DDP ranks, export, quantize) rebuilds the same one.
Token id 0 is padding (``[PAD]``), 1 is unknown (``[UNK]``); sequences are padded with 0 on
the right, which is also what a server that pads variable-length requests must send.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tensorwire.install_hint import install_hint
from tensorwire.trainer.errors import TrainerError

PAD_ID, UNK_ID = 0, 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]

#: Languages with fewer jokes than this in pyjokes are left out (too few to split three ways).
JOKES_MIN_PER_LANGUAGE = 40

TEXT_SUFFIXES = (".tsv", ".txt")


def jokes_corpus() -> tuple[list[str], np.ndarray, list[str]]:
    """pyjokes' jokes as (texts, labels, language codes); label i is ``languages[i]``.

    Raises TrainerError when pyjokes is not installed.
    """
    try:
        import pyjokes
    except ImportError:
        raise TrainerError(f"data 'jokes' needs the pyjokes package ({install_hint('train')})") from None
    languages = sorted(pyjokes.pyjokes.all_jokes)
    texts: list[str] = []
    labels: list[int] = []
    kept: list[str] = []
    for language in languages:
        table = pyjokes.pyjokes.all_jokes[language]
        jokes = sorted({joke.strip() for category, items in table.items() if category != "all" for joke in items})
        if len(jokes) < JOKES_MIN_PER_LANGUAGE:
            continue
        texts += jokes
        labels += [len(kept)] * len(jokes)
        kept.append(language)
    return texts, np.asarray(labels, dtype=np.int64), kept


def read_labelled_text(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """``label<TAB>text`` lines as (texts, labels, label names); raises TrainerError naming the line."""
    texts: list[str] = []
    raw: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TrainerError(f"{path}: not UTF-8 text ({err})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or not label.strip() or not text.strip():
            raise TrainerError(f"{path}: line {number} is not 'label<TAB>text'")
        raw.append(label.strip())
        texts.append(text.strip())
    if not texts:
        raise TrainerError(f"{path}: empty dataset (no 'label<TAB>text' lines)")
    if all(label.isdigit() for label in raw):
        labels = np.asarray([int(label) for label in raw], dtype=np.int64)
        names = [str(i) for i in range(int(labels.max()) + 1)]
    else:
        names = sorted(set(raw))
        labels = np.asarray([names.index(label) for label in raw], dtype=np.int64)
    return texts, labels, names


def train_tokenizer(texts: list[str], vocab_size: int):
    """A BPE tokenizer (HuggingFace ``tokenizers``) trained on ``texts``; ids 0/1 are [PAD]/[UNK]."""
    try:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    except ImportError:
        raise TrainerError(f"text data needs the tokenizers package ({install_hint('train')})") from None
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise TrainerError(f"--vocab-size must be at least {len(SPECIAL_TOKENS) + 1} (got {vocab_size})")
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def encode(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Token ids, shape (len(texts), max_length), int64, right-padded with :data:`PAD_ID` and
    truncated to ``max_length``; every row keeps at least one token."""
    out = np.full((len(texts), max_length), PAD_ID, dtype=np.int64)
    for row, encoding in enumerate(tokenizer.encode_batch(texts)):
        ids = encoding.ids[:max_length] or [UNK_ID]
        out[row, : len(ids)] = ids
    return out


def lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Number of tokens of each text (before padding or truncation)."""
    return np.asarray([len(encoding.ids) for encoding in tokenizer.encode_batch(texts)], dtype=np.int64)
