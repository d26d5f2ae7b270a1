"""``data=text``: next-token prediction on a corpus every Python install carries, its own
standard library's source files. No download.

Files are shuffled (seeded by ``data.split_seed``) and split by file into train/val/test, so no
context straddles two splits. The text becomes word-level tokens (identifiers, numbers, single
punctuation marks, newlines); the vocabulary is the ``data.vocab_size - 2`` most frequent tokens
of the training files plus ``<unk>`` and ``<eos>`` (end of file), learnt locally each run in
about a second. Each split is cut into sequences of ``data.seq_len + 1`` tokens:
``x`` = tokens[:-1], ``y`` = tokens[1:], both int64 [N, seq_len].
"""

from __future__ import annotations

import re
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.dataset import DataError, DataInfo, Dataset, Split

TOKEN = re.compile(r"\w+|[^\w\s]|\n")
UNK, EOS = "<unk>", "<eos>"


def corpus_files(seed: int) -> list[Path]:
    """The standard library's own .py files (tests and site-packages left out), shuffled."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "test", "tests", "idlelib"} & set(p.parts)
    )
    if not files:
        raise DataError(
            f"data=text: no Python source files found under {root} to build a corpus from."
        )
    order = np.random.default_rng(seed).permutation(len(files))
    return [files[i] for i in order]


def read_tokens(files: list[Path], max_tokens: int) -> list[list[str]]:
    """Token lists, one per file, until ``max_tokens`` tokens are read."""
    documents, total = [], 0
    for path in files:
        tokens = TOKEN.findall(path.read_text(encoding="utf-8", errors="replace"))
        if not tokens:
            continue
        documents.append(tokens[: max_tokens - total] + [EOS])
        total += len(documents[-1])
        if total >= max_tokens:
            break
    return documents


def learn_vocab(documents: list[list[str]], size: int) -> list[str]:
    counts = Counter(token for doc in documents for token in doc if token != EOS)
    # Ties broken by the token itself, so the vocabulary is the same on every machine.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK, EOS] + [token for token, _ in ranked[: size - 2]]


def to_sequences(documents: list[list[str]], index: dict[str, int], seq_len: int) -> Split:
    ids = np.fromiter((index.get(t, 0) for doc in documents for t in doc), dtype=np.int64)
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"data=text: a split has only {len(ids)} tokens, fewer than data.seq_len+1={seq_len + 1}; "
            f"raise data.max_tokens or lower data.seq_len."
        )
    x = torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len).copy())
    y = torch.from_numpy(ids[1 : n * seq_len + 1].reshape(n, seq_len).copy())
    return Split(x, y)


def build_text_dataset(cfg: Any) -> Dataset:
    if cfg.vocab_size < 16:
        raise DataError(
            f"data.vocab_size={cfg.vocab_size} is too small; use at least 16 (8k-64k is typical)."
        )
    documents = read_tokens(corpus_files(cfg.split_seed), cfg.max_tokens)
    n = len(documents)
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = max(1, round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise DataError(f"data=text: {n} files are too few to split; raise data.max_tokens.")
    test_docs, val_docs, train_docs = (
        documents[:n_test],
        documents[n_test : n_test + n_val],
        documents[n_test + n_val :],
    )
    vocab = learn_vocab(train_docs, cfg.vocab_size)
    index = {token: i for i, token in enumerate(vocab)}
    info = DataInfo("lm", cfg.seq_len, len(vocab))
    info.extra = {"vocab": vocab, "files": n, "tokens": sum(len(d) for d in documents)}
    return Dataset(
        to_sequences(train_docs, index, cfg.seq_len),
        to_sequences(val_docs, index, cfg.seq_len) if val_docs else None,
        to_sequences(test_docs, index, cfg.seq_len),
        info,
    )
