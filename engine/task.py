"""The task vocabulary: what a task's runs are measured by, named in one place.

A run's task (classification, regression, or next-token language modelling) decides the names of
its metrics (``acc``, ``f1``, ... or ``mse``, ``rmse``, ...), the metric it monitors by default
and whether higher is better, the metrics derived from others (perplexity), the units its
regression metrics are reported in, and the few values its console line shows. The trainer, the
entry point, the sweep and everything that reads a run afterwards ask a :class:`Task`; none of
them spells these out again.

``Task.of(info)`` describes the data of a built dataset; ``engine.data.describe_task`` gives the
same without building it (what a sweep needs before any trial runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.dataset import DataInfo

SPLITS = ("val", "test")
TOP_K = 5
# Metric names for which a larger value is better; every other metric (loss, errors,
# calibration error, perplexity) is better smaller.
_HIGHER_IS_BETTER = ("acc", "precision", "recall", "f1", "top", "r2")
# Perplexity is exp(loss); a diverged loss would overflow it.
_MAX_LOG_PERPLEXITY = 50.0


@dataclass(frozen=True)
class Task:
    kind: str
    """classification | regression | lm (next-token classification over a vocabulary)."""
    num_classes: int = 0
    """Classes (the vocabulary size for lm); 0 for regression."""
    target_mean: float = 0.0
    """Regression: the training split's target mean; the model learns standardised targets."""
    target_std: float = 1.0
    """Regression: the training split's target standard deviation."""

    @classmethod
    def of(cls, info: DataInfo) -> Task:
        return cls(info.task, info.num_classes, info.target_mean, info.target_std)

    # ---------------------------------------------------------------------------------------
    # names

    def metric_names(self) -> list[str]:
        """The metrics a split of this task reports, without the split prefix (``val/``)."""
        if self.kind == "regression":
            return ["mse", "rmse", "mae", "r2"]
        names = ["acc", "precision", "recall", "f1"]
        if self.num_classes > TOP_K:  # with fewer classes every row is a top-k hit
            names.append(f"top{TOP_K}")
        names.append("ece")
        return [*names, "perplexity"] if self.kind == "lm" else names

    def tags(self) -> list[str]:
        """Every final metric of a run, split prefix included (``val/loss``, ..., ``test/...``):
        the metric columns of TensorBoard's HPARAMS table."""
        return [f"{split}/{name}" for split in SPLITS for name in ["loss", *self.metric_names()]]

    @property
    def default_monitor(self) -> str:
        """What ``trainer.monitor=auto`` (and ``search.metric=auto``) means for this task."""
        return {"classification": "val/acc", "regression": "val/rmse", "lm": "val/loss"}[self.kind]

    def console_columns(self) -> tuple[str, ...]:
        """The values an epoch's console line shows (those the epoch has: no val split, no val/)."""
        if self.kind == "regression":
            return ("train/loss", "val/loss", "val/rmse", "val/r2")
        columns = ("train/loss", "val/loss", "val/acc", "val/f1")
        return (*columns, "val/perplexity") if self.kind == "lm" else columns

    # ---------------------------------------------------------------------------------------
    # values

    def derived(self, prefix: str, results: dict[str, float]) -> dict[str, float]:
        """Metrics computed from the others of a split (``prefix``: ``val`` or ``test``)."""
        if self.kind != "lm":
            return {}
        loss = results[f"{prefix}/loss"]
        return {f"{prefix}/perplexity": math.exp(min(loss, _MAX_LOG_PERPLEXITY))}

    def in_target_units(self, values: torch.Tensor) -> torch.Tensor:
        """Regression outputs or targets from the standardised scale the model learns back to
        the target's own units, the units every regression metric is reported in."""
        return values * self.target_std + self.target_mean


def higher_is_better(metric: str) -> bool:
    return any(h in metric.rsplit("/", 1)[-1] for h in _HIGHER_IS_BETTER)


def resolve_monitor(monitor: str, mode: str, task: Task) -> tuple[str, str]:
    """(metric, ``max`` | ``min``) from ``trainer.monitor`` / ``trainer.monitor_mode`` (or a
    sweep's objective), ``auto`` resolved for the task."""
    metric = task.default_monitor if monitor == "auto" else monitor
    if mode == "auto":
        mode = "max" if higher_is_better(metric) else "min"
    return metric, mode


def optuna_direction(metric: str, direction: str) -> str:
    """``maximize`` | ``minimize`` for a sweep objective; ``auto`` follows the metric's name."""
    if direction != "auto":
        return direction
    return "maximize" if higher_is_better(metric) else "minimize"
