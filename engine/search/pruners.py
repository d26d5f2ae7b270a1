"""Pruners by name, and the epoch callback that lets a trial's run report to its Optuna trial.

The trainer calls ``epoch_callback(epoch, metrics, final=...)`` after every epoch;
:class:`Reporter` reports the objective at step ``epoch + 1`` (the number of epochs done: the
resource Hyperband counts, from 1 like its ``min_resource``) and raises :class:`Pruned` when the
pruner says so. The run then stops, and ``engine.train.finish_job`` writes the TensorBoard
session with the status of a ``StopRun`` (the HPARAMS API has no "pruned" status; the sweep also
records the state as the ``trial.state`` hparam). A trial's final epoch is reported but never pruned: the run is done,
and pruning it then would only throw away its test metrics.

Where pruning can happen (``trainer.max_epochs`` = R, epochs counted from 1):

- ``median``: after any epoch from the 2nd on, once 4 trials have completed.
- ``hyperband`` (reduction factor 3, min resource 1): Optuna's brackets s = 0 .. floor(log3 R);
  bracket s has its rungs at epochs 3**s, 3**(s+1), ... below R (bracket 0: epochs 1, 3, 9, 27, ...;
  the last bracket runs every trial to the end).
- ``wilcoxon``: meant for cross-validation (``trainer.cv_folds``), where a trial reports one
  value per finished fold (step = the fold's index, :meth:`Reporter.fold`): Optuna's
  WilcoxonPruner pairs the trial's folds with the best trial's same folds and prunes when the
  one-sided signed-rank p-value is below ``search.wilcoxon_p_threshold``, from the 2nd fold on
  (and never at the last fold). Folds are the same rows for every trial (they depend on
  ``data.split_seed`` and k only), which is what makes the pairs paired.
"""

from __future__ import annotations

import math

import optuna

from engine.config import PRUNERS, ConfigError
from engine.trainer import StopRun


def make_pruner(
    name: str, max_epochs: int | None, p_threshold: float = 0.1
) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # Prune a trial whose value at an epoch is worse than the median of earlier trials at the
        # same epoch, once 4 trials have finished, from its second epoch on (steps count epochs
        # done, so step 1 is the first epoch, noisier than the rest).
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    if name == "hyperband":
        # Steps are epochs done (1-based, as min_resource=1 counts); the budget is the trials'
        # trainer.max_epochs when fixed, so the last bracket's rung is the final epoch.
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=max_epochs or "auto", reduction_factor=3
        )
    if name == "wilcoxon":
        # A signed-rank test needs at least two pairs; more startup steps would only delay it.
        return optuna.pruners.WilcoxonPruner(p_threshold=p_threshold, n_startup_steps=2)
    raise ConfigError(f"search.pruner={name!r} is unknown; choose one of {', '.join(PRUNERS)}")


class Pruned(optuna.TrialPruned, StopRun):
    """Raised from the epoch callback: Optuna's pruned trial, and for the run a ``StopRun``
    (its HPARAMS status: unknown, as the API has no "pruned")."""

    def __init__(self, epoch: int, value: float, unit: str = "epoch"):
        super().__init__(f"pruned after {unit} {epoch + 1} with value {value:.6g}")
        self.epoch, self.value = epoch, value


class Reporter:
    """The trial's ``epoch_callback``: report the objective each epoch, stop when pruned.

    With several objectives nothing is reported (Optuna prunes single-objective studies only);
    the metrics are still checked at the first epoch, so a misspelt ``search.metric`` fails the
    trial at once instead of after training.
    """

    def __init__(self, trial: optuna.Trial, metrics: list[str]):
        self.trial, self.metrics = trial, metrics
        self.last: dict[str, float] = {}
        self.epochs = 0

    def __call__(self, epoch: int, metrics: dict[str, float], final: bool = False) -> None:
        self.last, self.epochs = dict(metrics), epoch + 1
        # test/ metrics exist only at the end: nothing to check or report per epoch.
        missing = [m for m in self.metrics if m not in metrics and not m.startswith("test/")]
        if missing:
            raise ConfigError(
                f"search.metric={missing[0]} is not among the run's per-epoch metrics "
                f"({', '.join(sorted(metrics))}); pick one of them."
            )
        if len(self.metrics) != 1 or self.metrics[0] not in metrics:
            return
        value = float(metrics[self.metrics[0]])
        if not math.isfinite(value):
            return
        self.trial.report(value, self.epochs)
        if not final and self.trial.should_prune():
            raise Pruned(epoch, value)

    def fold(self, index: int, fold: dict[str, float], summary: dict[str, float], final: bool):
        """The trial's ``fold_callback`` under cross-validation: report the finished fold's own
        value of the objective (``val/acc`` for ``cv/val/acc_mean``) at step = the fold's index,
        and stop the trial when pruned. ``summary``: the cv metrics over the folds so far, what
        a pruned trial keeps as its results."""
        from engine.cv import fold_metric

        self.last, self.epochs = dict(summary), index + 1
        if len(self.metrics) != 1:
            return
        name = fold_metric(self.metrics[0])
        if name not in fold:
            raise ConfigError(
                f"search.metric={self.metrics[0]}: the folds report no {name} "
                f"({', '.join(sorted(fold))}); pick cv/<one of them>_mean."
            )
        value = float(fold[name])
        if not math.isfinite(value):
            return
        self.trial.report(value, index)
        if not final and self.trial.should_prune():
            raise Pruned(index, value, unit="fold")
