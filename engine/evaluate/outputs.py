"""The rows an evaluation scores and the model's outputs on them: a split of the run's own data
(the exact split and standardisation training used) or a new file with the training columns."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import data as data_mod
from engine import preprocess
from engine.config import ConfigError
from engine.dataset import DataError
from engine.keyvalue import suggest
from engine.predictor import Predictor


@dataclass
class Rows:
    """The scored rows: model inputs, targets (class indices, or values in target units), the
    raw frame of those rows when the data came from a file (for group_by), and where from."""

    x: torch.Tensor  # [N, F] standardised float32
    y: np.ndarray
    frame: Any | None
    source: str


def data_config(cfg: DictConfig, overrides: dict[str, Any]) -> DictConfig:
    """The run's data config with the command line's ``data.*`` keys on top; a key the run's
    data config does not have is refused (the run's config is not a strict schema)."""
    for key in overrides:
        if key not in cfg.data:
            raise ConfigError(
                f"unknown key 'data.{key}'{suggest(f'data.{key}', [f'data.{k}' for k in cfg.data])}. The run's data keys: "
                f"{', '.join(f'data.{k}' for k in cfg.data)}."
            )
    merged = OmegaConf.merge(cfg.data, OmegaConf.create(overrides))
    if "path" in overrides and merged.get("name") != "csv":
        merged.name = "csv"
    return merged


def _targets(values: Any, predictor: Predictor, source: str, column: str) -> np.ndarray:
    if predictor.info.task == "regression":
        where = f"{source}: column '{column}'"
        return preprocess.numeric_column(
            values,
            where,
            non_numeric="holds a non-numeric target ({value!r} in data row {row}).",
            not_finite="has {count} missing or infinite target(s) (first in data row {row}).",
        )
    return preprocess.class_indices(values, predictor.info, source, column)


def new_file_rows(cfg_data: DictConfig, predictor: Predictor) -> Rows:
    """Every row of ``data.path``, read by column name and scored on the run's target."""
    if predictor.info.task == "lm":
        raise ConfigError("data.path: a language-model run is evaluated on its own splits only.")
    path, frame = data_mod._csv_frame(cfg_data)
    source = str(path)
    preprocess.check_columns(list(frame.columns), predictor.info, source, target=cfg_data.target)
    x = predictor.inputs(frame, source)
    y = _targets(frame[cfg_data.target], predictor, source, str(cfg_data.target))
    return Rows(x, y, frame, source)


def split_rows(cfg_data: DictConfig, predictor: Predictor, split: str) -> Rows:
    """The run's own split, rebuilt as training built it, standardised with ``data_info.json``."""
    if cfg_data.name == "text":
        return _text_rows(cfg_data, split)
    table = data_mod.split_table(cfg_data)
    index = {"train": table.train, "val": table.val, "test": table.test}[split]
    if len(index) == 0:
        raise ConfigError(f"split={split}: the run has no {split} rows; use split=test.")
    x = torch.from_numpy(preprocess.standardize(table.x[index], predictor.info))
    frame = None
    if cfg_data.name == "csv":
        frame = data_mod._csv_frame(cfg_data)[1].iloc[index].reset_index(drop=True)
    return Rows(x, table.y[index], frame, f"{cfg_data.name} {split} split")


def _text_rows(cfg_data: DictConfig, split: str) -> Rows:
    """A text run's split as training built it (deterministic in ``data.split_seed``): token
    sequences and their next-token targets."""
    from engine.text import build_text_dataset

    dataset = build_text_dataset(cfg_data)
    part = {"train": dataset.train, "val": dataset.val, "test": dataset.test}[split]
    if part is None or len(part) == 0:
        raise ConfigError(f"split={split}: the run has no {split} sequences; use split=test.")
    return Rows(part.x, part.y.numpy(), None, f"text {split} split")


def model_outputs(predictor: Predictor, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The model over every row in batches (a progress bar when there are many batches)."""
    starts = range(0, len(x), batch_size)
    if len(starts) > 20:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch", file=sys.stderr)
    return torch.cat([predictor.outputs(x[i : i + batch_size]) for i in starts])


def csv_path_of(cfg_data: DictConfig) -> Path | None:
    if cfg_data.get("name") != "csv" or not cfg_data.get("path"):
        return None
    return Path(str(cfg_data.path)).expanduser().resolve()


def check_group_column(frame: Any, column: str, predictor: Predictor, source: str) -> None:
    if predictor.info.task == "lm":
        raise ConfigError(
            f"eval.group_by={column}: a language-model run has no columns to group by."
        )
    names = preprocess.feature_names(predictor.info)
    have = list(frame.columns) if frame is not None else names
    if column not in have:
        raise DataError(
            f"eval.group_by={column}: no such column in {source}. Its columns are "
            f"{', '.join(map(str, have[:30]))}."
        )
