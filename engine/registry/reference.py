"""The reference sample of a version: training rows, for drift monitoring to compare against.

Up to ``MAX_ROWS`` rows of the run's training split, raw features (in their own units, in the
model's feature order) and targets (class indices, or values in the target's units), rebuilt
from the run's data config with the exact split training used (``engine.data.split_table``).
The rows are checked against the data card's fingerprint first: a file that changed since
training gives no sample rather than a wrong one. Saved in the engine's checkpoint format
(tensors and JSON, nothing executable).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from engine import checkpoint as ckpt
from engine.datacard import rows_fingerprint
from engine.preprocess import feature_names

MAX_ROWS = 10_000
FORMAT_KEY = "reference"


def sample(
    cfg: DictConfig, fingerprint: str | None
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the sample as ``read`` returns it, what the lineage records about it); no sample, with
    the reason recorded, when the training rows cannot be rebuilt."""
    from engine.data import split_table
    from engine.dataset import DataError

    if cfg.data.name == "text":
        return None, {"rows": 0, "reason": "a language-model run has no table of rows"}
    try:
        table = split_table(cfg.data)
    except (DataError, ValueError, OSError) as err:  # ConfigError is a ValueError
        return None, {"rows": 0, "reason": f"its training data could not be read: {err}"}
    rows = table.train
    if fingerprint and rows_fingerprint(table.x[rows], table.y[rows]) != fingerprint:
        return None, {
            "rows": 0,
            "reason": "its training data changed since the run (the rows' fingerprint differs "
            "from the data card's)",
        }
    if len(rows) > MAX_ROWS:  # a seeded subset, the same on every registration
        rows = np.sort(np.random.default_rng(0).choice(rows, MAX_ROWS, replace=False))
    arrays = {
        "features": feature_names(table.info),
        "task": table.info.task,
        "rows": rows.astype(np.int64),
        "x": np.ascontiguousarray(table.x[rows]),
        "y": np.ascontiguousarray(table.y[rows]),
    }
    return arrays, {"rows": int(len(rows)), "of_training_rows": int(len(table.train))}


def build(cfg: DictConfig, fingerprint: str | None) -> tuple[bytes | None, dict[str, Any]]:
    """(the sample file's bytes, what the lineage records about it); no bytes, with the
    reason recorded, when the training rows cannot be rebuilt."""
    arrays, about = sample(cfg, fingerprint)
    if arrays is None:
        return None, about
    state = {
        "format": ckpt.FORMAT,
        "kind": FORMAT_KEY,
        "features": arrays["features"],
        "task": arrays["task"],
        **{key: torch.from_numpy(arrays[key]) for key in ("rows", "x", "y")},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.pt"
        ckpt.save_atomic(state, path)
        data = path.read_bytes()
    return data, about


def read(path: Path) -> dict[str, Any]:
    """``{"features": [...], "task", "rows": [N] training-row indices, "x": [N, F] raw
    features, "y": [N] targets}`` as NumPy arrays."""
    state = ckpt.load(path, setting="reference")
    return {
        "features": list(state["features"]),
        "task": state["task"],
        "rows": state["rows"].numpy(),
        "x": state["x"].numpy(),
        "y": state["y"].numpy(),
    }
