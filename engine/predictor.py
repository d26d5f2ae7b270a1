"""One loader for a trained model and its preprocessing: a run dir (or a registered version's
files) in, a ``Predictor`` out that takes raw rows and answers in the data's own terms.

Evaluation, the registry's ``load``, serving and batch prediction all build their model here, so
the same rows give the same outputs in each (the architecture's rule). What a model needs beside
its weights is its run's resolved config (``.hydra/config.yaml``: the model's shape) and its
``data_info.json`` (feature order, the training split's standardisation, the label mapping, the
regression target's scale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from engine import checkpoint as ckpt
from engine import preprocess
from engine.config import ConfigError
from engine.dataset import DataInfo
from engine.task import Task

CHECKPOINTS = ("best", "last")


def run_config(run_dir: Path) -> DictConfig:
    """The resolved config a run was trained with, from its ``.hydra/config.yaml``."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"run={run_dir}: not a run dir of this engine (it has no .hydra/config.yaml). Pass "
            f"the folder a training run wrote, e.g. outputs/runs/<date>_<time>."
        )
    return OmegaConf.load(path)


def run_info(run_dir: Path) -> DataInfo:
    """The run's ``data_info.json`` (and ``vocab.json`` of a text run) as a ``DataInfo``."""
    path = Path(run_dir) / "data_info.json"
    if not path.is_file():
        raise ConfigError(
            f"run={run_dir}: it has no data_info.json; the run did not get past building its "
            f"data. Pass the run dir of a run that trained."
        )
    info = DataInfo.from_json(json.loads(path.read_text()))
    vocab = Path(run_dir) / "vocab.json"
    if vocab.is_file():
        info.extra["vocab"] = json.loads(vocab.read_text())
    return info


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    """``best`` (the weights the run's test metrics come from), ``last``, or a file's path."""
    run_dir = Path(run_dir)
    if which not in CHECKPOINTS:
        path = Path(which).expanduser()
        if not path.is_file():
            raise ckpt.CheckpointError(
                f"checkpoint={which}: no such file; use checkpoint=best, checkpoint=last or the "
                f"path of a checkpoint file."
            )
        return path
    path = run_dir / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
        raise ckpt.CheckpointError(
            f"run={run_dir}: it has no checkpoints/{which}.pt"
            + (f" (it has {', '.join(have)}: pass checkpoint=last)" if have else "")
            + ". Train it with trainer.save_checkpoints=true, or pass another run dir."
        )
    return path


@dataclass
class Predictions:
    """What a model says about raw rows, in the data's own terms."""

    outputs: np.ndarray  # [N, C] logits, or [N] values in the target's units
    labels: list[str] | None = None  # classification: the predicted classes' names
    probabilities: np.ndarray | None = None  # [N, C]
    confidence: np.ndarray | None = None  # [N], the top class's probability
    class_index: np.ndarray | None = None  # [N] int64, the predicted classes' indices


@dataclass
class Predictor:
    """A trained model in eval mode on its device, with the preprocessing it was trained with."""

    cfg: DictConfig
    info: DataInfo
    model: torch.nn.Module
    device: torch.device
    checkpoint: Path

    @property
    def task(self) -> Task:
        return Task.of(self.info)

    @property
    def feature_names(self) -> list[str]:
        return preprocess.feature_names(self.info)

    def inputs(self, frame: Any, source: str = "input") -> torch.Tensor:
        """Raw rows (a pandas frame with the training columns) to the model's input [N, F]."""
        return torch.from_numpy(preprocess.model_inputs(frame, self.info, source))

    @torch.inference_mode()
    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The model's raw outputs for standardised inputs: logits [N, C], or standardised
        regression values [N]; on the CPU, float32."""
        return self.model(x.to(self.device, non_blocking=True)).float().cpu()

    def predict(self, frame: Any, source: str = "input") -> Predictions:
        return self.decode(self.outputs(self.inputs(frame, source)))

    def decode(self, out: torch.Tensor) -> Predictions:
        """Raw outputs to predictions: class names, probabilities and confidence, or values in
        the target's units."""
        if self.info.task == "regression":
            return Predictions(preprocess.target_units(out.numpy(), self.info))
        probs = torch.softmax(out, dim=-1)
        confidence, index = probs.max(dim=-1)
        index = index.numpy()
        return Predictions(
            out.numpy(),
            preprocess.class_names(index, self.info),
            probs.numpy(),
            confidence.numpy(),
            index,
        )


def load(
    cfg: DictConfig, info: DataInfo, checkpoint: Path, device: str | torch.device = "cpu"
) -> Predictor:
    """A predictor from a config, a data info and a checkpoint file (a run dir's or a
    registered version's copies of them)."""
    from engine.models import build_model

    if (
        info.task != "lm"
        and bool(OmegaConf.select(cfg, "data.standardize", default=True))
        and info.feature_mean is None
    ):
        raise ConfigError(
            f"the data_info.json beside {checkpoint} lacks the training split's feature "
            f"standardisation (written by an older version of this engine); train the run again."
        )
    device = torch.device(device)
    model = build_model(cfg.model, info)
    weights = ckpt.load(checkpoint, setting="checkpoint").get("model")
    if not isinstance(weights, dict):
        raise ckpt.CheckpointError(f"checkpoint {checkpoint} holds no model weights.")
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ckpt.CheckpointError(
            f"checkpoint {checkpoint} does not fit the model its config describes "
            f"({str(err).splitlines()[0]})."
        ) from err
    model.to(device).eval()
    return Predictor(cfg, info, model, device, Path(checkpoint))


def load_run(
    run_dir: Path, checkpoint: str = "best", device: str | torch.device = "cpu"
) -> Predictor:
    """The model of a run dir: its ``best`` (or ``last``, or a named) checkpoint."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise ConfigError(f"run={run_dir}: no such folder; pass the run dir of a training run.")
    cfg = run_config(run_dir)
    return load(cfg, run_info(run_dir), checkpoint_path(run_dir, checkpoint), device)
