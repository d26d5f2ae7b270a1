"""Datasets, the seeded train/val/test split, feature standardisation and in-memory loaders.

Every dataset becomes three ``Split``s of tensors: features ``x`` [N, F] (float32) and targets
``y`` [N] (int64 class indices, or float32 for regression). Tables are small enough to live in
memory, so batches are index slices of those tensors (on the training device when it fits):
no per-sample ``Dataset.__getitem__`` and collate, which would dominate a small model's step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.dataset import DataError, DataInfo, Dataset, Split
from engine.preprocess import numeric_column
from engine.task import Task

# --------------------------------------------------------------------------------------------
# Loading


# The embedded datasets' tasks (kind, classes): what a sweep learns without loading them.
EMBEDDED = {
    "digits": ("classification", 10),
    "breast_cancer": ("classification", 2),
    "wine": ("classification", 3),
    "diabetes": ("regression", 0),
}


def _sklearn_table(name: str) -> tuple[np.ndarray, np.ndarray, DataInfo]:
    from sklearn import datasets as skd

    loader = {
        "digits": skd.load_digits,
        "breast_cancer": skd.load_breast_cancer,
        "wine": skd.load_wine,
        "diabetes": skd.load_diabetes,
    }[name]
    bunch = loader()
    x = np.asarray(bunch.data, dtype=np.float32)
    if EMBEDDED[name][0] == "regression":
        y = np.asarray(bunch.target, dtype=np.float32)
        info = DataInfo("regression", x.shape[1], 0, feature_names=list(bunch.feature_names))
        return x, y, info
    y = np.asarray(bunch.target, dtype=np.int64)
    names = [str(n) for n in getattr(bunch, "target_names", range(int(y.max()) + 1))]
    info = DataInfo("classification", x.shape[1], len(names), class_names=names)
    info.feature_names = [str(f) for f in bunch.feature_names]
    if name == "digits":
        info.input_shape = (1, 8, 8)
        info.class_names = [str(i) for i in range(10)]
    return x, y, info


def _synthetic_table(cfg: Any) -> tuple[np.ndarray, np.ndarray, DataInfo]:
    rng = np.random.default_rng(cfg.seed)
    n, f, c = cfg.n_samples, cfg.n_features, cfg.n_classes
    if c == 0:
        w = rng.standard_normal(f).astype(np.float32)
        x = rng.standard_normal((n, f), dtype=np.float32)
        y = x @ w + cfg.noise * rng.standard_normal(n).astype(np.float32)
        return x, y.astype(np.float32), DataInfo("regression", f, 0)
    # Gaussian clusters whose centres sit ~2 std apart: learnable, not trivially separable.
    centres = rng.standard_normal((c, f), dtype=np.float32) * (2.0 / math.sqrt(max(f, 1)) * 3)
    y = rng.integers(0, c, size=n)
    x = centres[y] + rng.standard_normal((n, f), dtype=np.float32)
    flip = rng.random(n) < cfg.noise
    y[flip] = rng.integers(0, c, size=int(flip.sum()))
    return x.astype(np.float32), y.astype(np.int64), DataInfo("classification", f, c)


def header_names(path: Path, parquet: bool) -> list[str]:
    """The column names as written in the file, before pandas makes them unique."""
    if parquet:
        import pyarrow.parquet as pq

        return [str(name) for name in pq.read_schema(path).names]
    import pandas as pd

    # The same parser as the full read, so quoting and delimiters agree; every cell as text.
    head = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
    return [str(name) for name in head.iloc[0]]


def _check_unique_names(names: list[str], path: Path, target: str | None) -> None:
    positions: dict[str, list[int]] = {}
    for i, name in enumerate(names, start=1):
        if name:  # empty header cells get distinct "Unnamed: i" names from pandas: no ambiguity
            positions.setdefault(name, []).append(i)
    repeated = {name: where for name, where in positions.items() if len(where) > 1}
    if not repeated:
        return
    listing = "; ".join(
        f"'{name}' (columns {', '.join(map(str, where))})" for name, where in repeated.items()
    )
    # pandas would rename the copies ('label' -> 'label.1'): a copy of the target would then
    # be an ordinary feature holding the answer, and val/acc a meaningless 1.0.
    leak = (
        f" '{target}' is the target (data.target): its copy would be read as a feature that "
        f"holds the answer."
        if target in repeated
        else ""
    )
    raise DataError(
        f"{path} has repeated column names, which are ambiguous: {listing}.{leak} "
        f"Give every column its own name (or drop the copies) in the file."
    )


def _read_frame(path: Path, target: str | None = None):
    import pandas as pd

    if not path.exists():
        raise DataError(
            f"data.path: file not found: {path} (relative paths resolve from the folder you ran "
            f"the command in, {Path.cwd()}). Pass an existing .csv or .parquet file."
        )
    suffix = path.suffix.lower()
    parquet = suffix in (".parquet", ".pq")
    try:
        # Checked before the full read: pandas renames a CSV's repeated names, and fails on a
        # parquet file's with an unhelpful "Multiple matches for FieldRef".
        _check_unique_names(header_names(path, parquet), path, target)
        if parquet:
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except DataError:
        raise
    except Exception as err:  # pandas raises many types; the user needs the file and the cause
        if type(err).__name__ == "EmptyDataError":
            raise DataError(f"data.path: {path} is empty: it has no header and no rows.") from err
        raise DataError(f"data.path: could not read {path} as {suffix or 'csv'}: {err}") from err


def _numeric_column(frame, column: str, path: Path) -> np.ndarray:
    return numeric_column(
        frame[column],
        f"{path}: column '{column}'",
        non_numeric="holds non-numeric values (e.g. {value!r} in data row {row}). Encode it as "
        "numbers, or leave it out with data.features=[...].",
        not_finite="has {count} missing or infinite cells (first in data row {row}). Fill or "
        "drop those rows before training.",
    )


def _is_classification_target(values: np.ndarray) -> bool:
    if values.dtype.kind in "OUSb":
        return True
    if values.dtype.kind in "iu":
        return len(np.unique(values)) <= max(2, min(100, len(values) // 5))
    if values.dtype.kind == "f":
        whole = np.all(np.mod(values, 1) == 0)
        return bool(whole) and len(np.unique(values)) <= max(2, min(100, len(values) // 5))
    return False


def _check_csv_target(cfg: Any, path: Path, columns: list[str]) -> None:
    if not cfg.target:  # checked here, after the file: a missing file is the first thing to say
        raise DataError(
            f"data=csv needs data.target=<column name>; the columns of {path} are: "
            f"{', '.join(columns)}."
        )
    if cfg.target not in columns:
        raise DataError(
            f"data.target='{cfg.target}' is not a column of {path}. Its columns are: "
            f"{', '.join(columns)}."
        )


def _csv_frame(cfg: Any):
    """(path, the table with string column names): a file with rows and the target column."""
    path = Path(cfg.path).expanduser().resolve()
    frame = _read_frame(path, cfg.target)
    if len(frame) == 0:
        raise DataError(f"data.path: {path} has a header but no data rows.")
    frame.columns = [str(c) for c in frame.columns]
    _check_csv_target(cfg, path, list(frame.columns))
    return path, frame


def _csv_table(cfg: Any) -> tuple[np.ndarray, np.ndarray, DataInfo]:
    path, frame = _csv_frame(cfg)
    columns = list(frame.columns)
    if cfg.features:
        listed = [str(c) for c in cfg.features]
        twice = list(dict.fromkeys(c for i, c in enumerate(listed) if c in listed[:i]))
        if twice:
            raise DataError(
                f"data.features lists {', '.join(repr(c) for c in twice)} more than once; list "
                f"each feature column once."
            )
        if cfg.target in listed:
            raise DataError(
                f"data.features includes the target column '{cfg.target}' (data.target): the "
                f"model would be given the answer as an input. Remove '{cfg.target}' from "
                f"data.features (or leave data.features unset: every column but the target)."
            )
    features = list(cfg.features) if cfg.features else [c for c in columns if c != cfg.target]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(f"data.features: {missing} not found in {path}; columns are {columns}.")
    if not features:
        raise DataError(f"{path} has no feature columns besides the target '{cfg.target}'.")
    x = np.stack([_numeric_column(frame, c, path) for c in features], axis=1)
    raw, task, labels = _csv_target(frame, cfg, path)
    if task == "regression":
        y = _numeric_column(frame, cfg.target, path)
        return x, y, DataInfo("regression", x.shape[1], 0, feature_names=features)
    index = {label: i for i, label in enumerate(labels.tolist())}
    keyed = raw.astype(str) if raw.dtype.kind in "OUSb" else raw
    y = np.array([index[v] for v in keyed.tolist()], dtype=np.int64)
    names = [str(v) for v in labels.tolist()]
    info = DataInfo(
        "classification", x.shape[1], len(labels), class_names=names, feature_names=features
    )
    if raw.dtype.kind in "OUSb":
        info.label_mapping = {name: i for i, name in enumerate(names)}
    return x, y, info


def _csv_target(frame, cfg: Any, path: Path) -> tuple[np.ndarray, str, np.ndarray | None]:
    """(the target column's values, its task, its classes: the sorted distinct labels, or None
    for regression); refuses empty cells and a single class."""
    target = frame[cfg.target]
    if target.isna().any():
        row = int(np.flatnonzero(target.isna().to_numpy())[0])
        raise DataError(
            f"{path}: target column '{cfg.target}' has {int(target.isna().sum())} empty cells "
            f"(first in data row {row + 1}). Drop or fill those rows."
        )
    raw = target.to_numpy()
    task = (
        cfg.task
        if cfg.task != "auto"
        else ("classification" if _is_classification_target(raw) else "regression")
    )
    if task == "regression":
        return raw, task, None
    # Classes are the sorted distinct labels; strings are mapped and the mapping is recorded.
    labels = np.unique(raw.astype(str)) if raw.dtype.kind in "OUSb" else np.unique(raw)
    if len(labels) < 2:
        raise DataError(
            f"{path}: target column '{cfg.target}' has a single class ({labels[0]!r}); a "
            f"classifier needs at least two. Use data.task=regression for a numeric target."
        )
    return raw, task, labels


def describe_task(cfg: Any) -> Task:
    """The task of ``data`` without building the dataset: what a sweep needs before its trials.

    Embedded and synthetic data are known from the config; a csv file is read for its target
    column (the file, its header and the target are checked here, the features by each run);
    text is next-token prediction over at most ``data.vocab_size`` tokens."""
    if cfg.name in EMBEDDED:
        return Task(*EMBEDDED[cfg.name])
    if cfg.name == "synthetic":
        return Task("regression") if cfg.n_classes == 0 else Task("classification", cfg.n_classes)
    if cfg.name == "text":
        return Task("lm", cfg.vocab_size)
    if cfg.name == "csv":
        path, frame = _csv_frame(cfg)
        _, task, labels = _csv_target(frame, cfg, path)
        return Task(task, 0 if labels is None else len(labels))
    raise DataError(f"data.name='{cfg.name}' is not a dataset of this engine.")


def load_table(cfg: Any) -> tuple[np.ndarray, np.ndarray, DataInfo]:
    """Return features [N, F] float32, targets [N], and what the rest of the engine needs."""
    if cfg.name in EMBEDDED:
        return _sklearn_table(cfg.name)
    if cfg.name == "synthetic":
        return _synthetic_table(cfg)
    if cfg.name == "csv":
        return _csv_table(cfg)
    raise DataError(f"data.name='{cfg.name}' has no tabular loader.")


# --------------------------------------------------------------------------------------------
# Split and standardise


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int, y=None):
    """Seeded shuffle split; stratified by class when ``y`` holds classes, so small sets stay balanced."""
    rng = np.random.default_rng(seed)
    n_test = max(1, round(n * test_fraction))
    n_val = round(n * val_fraction)
    if n - n_test - n_val < 1:
        raise DataError(
            f"data: {n} rows are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}; lower them or add rows."
        )
    if y is None:
        order = rng.permutation(n)
    else:
        # Interleave a shuffled list of each class so every prefix is close to class-balanced.
        keys = np.empty(n)
        for cls in np.unique(y):
            members = np.flatnonzero(y == cls)
            keys[members] = (rng.permutation(len(members)) + rng.random()) / len(members)
        order = np.lexsort((rng.random(n), keys))
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return np.sort(train), np.sort(val), np.sort(test)


@dataclass
class Table:
    """A table's rows as loaded (features and targets in their own units) and its seeded split,
    as row indices into them: what the dataset, the data card, cross-validation's folds and the
    evaluation of a split are all made from, so they agree on which rows are which."""

    x: np.ndarray  # [N, F] float32, raw
    y: np.ndarray  # [N] int64 class indices, or float32 targets in their own units
    info: DataInfo
    train: np.ndarray  # sorted row indices
    val: np.ndarray
    test: np.ndarray


def split_table(cfg: Any) -> Table:
    """Load a table and split it (seeded by ``data.split_seed``, stratified by class)."""
    x, y, info = load_table(cfg)
    if len(x) < 3:
        raise DataError(f"data: {len(x)} rows are too few to split into train, val and test.")
    classes = y if info.task == "classification" else None
    tr, va, te = split_indices(len(x), cfg.val_fraction, cfg.test_fraction, cfg.split_seed, classes)
    return Table(x, y, info, tr, va, te)


def dataset_from_table(table: Table, standardize: bool) -> Dataset:
    """The splits as tensors, features (and regression targets) standardised with the training
    split's statistics only, which ``info`` records for whoever loads the model later."""
    x, y, info = table.x, table.y, dataclasses.replace(table.info)
    tr = table.train
    if standardize:
        mean = x[tr].mean(axis=0)
        std = x[tr].std(axis=0)
        std[std < 1e-8] = 1.0  # constant columns stay constant instead of dividing by zero
        x = (x - mean) / std
        info.feature_mean = [float(v) for v in mean]
        info.feature_std = [float(v) for v in std]
    if info.task == "regression":
        info.target_mean = float(y[tr].mean())
        info.target_std = float(y[tr].std()) or 1.0
        y = (y - info.target_mean) / info.target_std

    def make(idx: np.ndarray) -> Split:
        return Split(
            torch.from_numpy(np.ascontiguousarray(x[idx])),
            torch.from_numpy(np.ascontiguousarray(y[idx])),
        )

    va = table.val
    return Dataset(make(tr), make(va) if len(va) else None, make(table.test), info)


def build_dataset(cfg: Any) -> Dataset:
    """Load, split (seeded by ``data.split_seed``) and standardise on the training split only."""
    if cfg.name == "text":
        from engine.text import build_text_dataset

        return build_text_dataset(cfg)
    return dataset_from_table(split_table(cfg), cfg.standardize)


def write_data_info(info: DataInfo, run_dir: Path) -> None:
    """Record what the run saw of its data, and the label mapping of string labels."""
    record = info.to_json()
    vocab = record["extra"].pop("vocab", None)
    (run_dir / "data_info.json").write_text(json.dumps(record, indent=2))
    if vocab is not None:
        (run_dir / "vocab.json").write_text(json.dumps(vocab))
    if info.label_mapping:
        (run_dir / "label_mapping.json").write_text(json.dumps(info.label_mapping, indent=2))


# --------------------------------------------------------------------------------------------
# Loaders


class BatchLoader:
    """Yields (x, y) batches as index slices of in-memory tensors.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` alone, so a loader can be
    rebuilt anywhere (after a resume, on another rank) and produce the same batches; ``start``
    skips the batches an interrupted epoch already consumed. Under DDP each rank takes every
    ``world_size``-th index of the padded permutation, as DistributedSampler does.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        n = len(split)
        # Training pads so every rank runs the same number of steps; evaluation must count each
        # row once, so it shards without padding (ranks may then differ by one row).
        self.per_rank = math.ceil(n / world_size) if shuffle else len(range(rank, n, world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def _indices(self) -> torch.Tensor | None:
        n = len(self.split)
        if not self.shuffle and self.world_size == 1:
            return None
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world_size, device=self.split.x.device)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen)
        total = self.per_rank * self.world_size
        if total > n:  # pad by repeating the head so every rank gets the same number of rows
            order = torch.cat([order, order[: total - n]])
        return order[self.rank :: self.world_size].to(self.split.x.device)

    def iter_from(self, start: int = 0):
        """Batches of this epoch, beginning at batch index ``start``."""
        indices = self._indices()
        x, y, bs = self.split.x, self.split.y, self.batch_size
        for b in range(start, len(self)):
            if indices is None:
                yield x[b * bs : (b + 1) * bs], y[b * bs : (b + 1) * bs]
            else:
                idx = indices[b * bs : (b + 1) * bs]
                yield x.index_select(0, idx), y.index_select(0, idx)

    def __iter__(self):
        return self.iter_from(0)
