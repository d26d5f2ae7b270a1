"""What every data source produces: the splits, what the rest of the engine needs to know about
them, and the error a user can fix. Its own module so that every source (engine/data.py's
tables, engine/text.py's corpus) produces them without importing the others.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch


class DataError(ValueError):
    """Unusable input data; the message names the file, column or key and says how to fix it."""


@dataclass
class DataInfo:
    """What the model, loss and metrics need to know about the data."""

    task: str  # "classification" | "regression" | "lm"
    num_features: int
    num_classes: int  # 0 for regression
    input_shape: tuple[int, ...] | None = None  # e.g. (1, 8, 8) for the digits images
    class_names: list[str] | None = None
    feature_names: list[str] | None = None
    label_mapping: dict[str, int] | None = None  # string labels of a csv, in index order
    target_mean: float = 0.0  # regression targets are standardised on train; metrics undo it
    target_std: float = 1.0
    # The training split's per-feature mean and std the features were standardised with (None:
    # data.standardize=false, or text): what a loaded model applies to raw rows.
    feature_mean: list[float] | None = None
    feature_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> DataInfo:
        """The inverse of ``to_json`` (a run dir's ``data_info.json``); unknown keys are left."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        if values.get("input_shape") is not None:
            values["input_shape"] = tuple(values["input_shape"])
        return cls(**values)


@dataclass
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device) -> Split:
        return Split(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))


@dataclass
class Dataset:
    train: Split
    val: Split | None
    test: Split
    info: DataInfo
