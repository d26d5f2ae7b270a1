"""Raw rows in, model inputs out, and model outputs back in the data's own terms.

A trained model sees standardised features in a fixed column order and class indices; its
users have rows with named columns in raw units and string labels. These functions are the one
translation between the two, driven by a run's ``DataInfo`` (``data_info.json``): evaluation of a
new file, the registry's loaded models, serving and batch prediction all call them, so the same
rows give the same inputs everywhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.dataset import DataError, DataInfo


def feature_names(info: DataInfo) -> list[str]:
    """The feature columns a model reads, in its input order (``f0, f1, ...`` for data whose
    source named none, e.g. synthetic)."""
    if info.feature_names:
        return list(info.feature_names)
    return [f"f{i}" for i in range(info.num_features)]


def check_columns(columns: list[str], info: DataInfo, source: str, *, target: str | None) -> None:
    """Refuse a table that lacks a feature column the model was trained on."""
    wanted = feature_names(info)
    missing = [c for c in wanted if c not in columns]
    if missing:
        shown = ", ".join(repr(c) for c in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise DataError(
            f"{source}: {len(missing)} feature column(s) the model was trained on are missing: "
            f"{shown}. It needs the columns {', '.join(wanted[:8])}"
            f"{' ...' if len(wanted) > 8 else ''} (as in training)"
            + (f", and the target '{target}' to be scored" if target else "")
            + "."
        )


def feature_matrix(frame: Any, info: DataInfo, source: str) -> np.ndarray:
    """[N, F] float32 raw features from a pandas frame, columns by name in training order;
    a missing column, a non-numeric, missing or infinite cell is a ``DataError`` naming it."""

    check_columns([str(c) for c in frame.columns], info, source, target=None)
    names = feature_names(info)
    # The common case, numeric columns with finite values, in one conversion; anything else
    # goes column by column, so the error names the column and the row.
    if names and all(frame[n].dtype.kind in "iuf" for n in names):
        x = frame[names].to_numpy(dtype=np.float64)
        if np.isfinite(x).all():
            return x.astype(np.float32)
    columns = [
        numeric_column(
            frame[name],
            f"{source}: column '{name}'",
            non_numeric="holds a non-numeric value ({value!r} in data row {row}); the model "
            "reads it as a number.",
            not_finite="has {count} missing or infinite cell(s) (first in data row {row}); "
            "fill or drop those rows.",
        )
        for name in feature_names(info)
    ]
    return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0), np.float32)


def numeric_column(raw: Any, where: str, *, non_numeric: str, not_finite: str) -> np.ndarray:
    """A pandas column as float32, or a ``DataError``: ``where`` + ``non_numeric`` (formatted
    with the first bad ``value`` and its 1-based ``row``), or + ``not_finite`` (with ``count``
    and ``row``) for missing or infinite cells."""
    import pandas as pd

    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where} " + non_numeric.format(value=raw.iloc[row], row=row + 1))
    array = values.to_numpy(dtype=np.float64)
    finite = np.isfinite(array)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise DataError(f"{where} " + not_finite.format(count=int((~finite).sum()), row=row + 1))
    return array.astype(np.float32)


def standardize(x: np.ndarray, info: DataInfo) -> np.ndarray:
    """Raw features as the model was trained on them: the training split's mean and std."""
    if info.feature_mean is None or info.feature_std is None:
        return x.astype(np.float32, copy=False)
    mean = np.asarray(info.feature_mean, dtype=np.float32)
    std = np.asarray(info.feature_std, dtype=np.float32)
    return ((x - mean) / std).astype(np.float32, copy=False)


def model_inputs(frame: Any, info: DataInfo, source: str) -> np.ndarray:
    """``standardize(feature_matrix(...))``: raw rows to the model's input [N, F]."""
    return standardize(feature_matrix(frame, info, source), info)


def class_indices(values: Any, info: DataInfo, source: str, column: str) -> np.ndarray:
    """A target column's labels (as the training file wrote them) to class indices [N]."""
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    index = {_label_key(name): i for i, name in enumerate(names)}
    keys = [_label_key(v) for v in np.asarray(values).tolist()]
    unknown = sorted({k for k in keys if k not in index})
    if unknown:
        raise DataError(
            f"{source}: column '{column}' holds label(s) the model was not trained on: "
            f"{', '.join(repr(u) for u in unknown[:8])}. Its classes are {', '.join(names[:20])}."
        )
    return np.array([index[k] for k in keys], dtype=np.int64)


def _label_key(value: Any) -> str:
    # Training named the classes by their text; a numeric label matches by value, so a class
    # "3" is found for 3, 3.0 or "3.0" (pandas reads an integer column with a gap as float).
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    if not np.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def class_names(indices: np.ndarray, info: DataInfo) -> list[str]:
    """Class indices back to the labels of the training data."""
    names = info.class_names or [str(i) for i in range(info.num_classes)]
    return [names[int(i)] for i in indices]


def target_units(values: np.ndarray, info: DataInfo) -> np.ndarray:
    """A regression model's standardised outputs in the target's own units."""
    return values * info.target_std + info.target_mean
