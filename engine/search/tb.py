"""TensorBoard output of a sweep: one HPARAMS session per trial, and a study-level run.

- Each trial's ``tb/`` gets its HPARAMS session when the trial ends (start and end together, so
  ``trial.state`` can be an hparam: complete, pruned or failed), its params and flattened config
  as hparams, its status (success; unknown for pruned, as the API has no "pruned"; failure), and a
  ``trial/value`` scalar (the objective, or the last reported value of a pruned trial).
- ``<sweep dir>/study/`` holds the one experiment summary of the sweep (which hparams and metrics
  the dashboard shows as columns: the params and ``trial.state`` first, marked as differing, and
  the objectives first among the metrics) and the study's curves over finished trials:
  ``study/value``, ``study/best_value`` (best so far), the running counts of complete, pruned and
  failed trials, and the leaderboard as text. It is rewritten whole (when the sweep command
  starts, as its trials finish, and when it ends), so a resumed sweep has one curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch.utils.tensorboard import SummaryWriter

from engine.search.storage import FINISHED_NAMES, STATE_NAMES
from engine.tb import experiment_summary, session_end_summary, session_start_summary

STUDY_RUN = "study"


def write_trial_session(
    tb_dir: Path, hparams: Mapping[str, Any], status: str, value: float | None, step: int
) -> None:
    writer = SummaryWriter(str(tb_dir))
    try:
        fw = writer._get_file_writer()
        fw.add_summary(session_start_summary(hparams))
        if value is not None and math.isfinite(value):
            writer.add_scalar("trial/value", value, step)
        fw.add_summary(session_end_summary(status))
    finally:
        writer.close()


def _example(value: Any) -> Any:
    return value if isinstance(value, bool | int | float | str) else str(value)


def write_study_run(
    sweep_dir: Path,
    trials: Sequence[FrozenTrial],
    *,
    metrics: list[str],
    directions: list[str],
    params: Mapping[str, Any],
    config_hparams: Mapping[str, Any],
    metric_tags: list[str],
    leaderboard: str,
    choices: Mapping[str, Sequence[Any]] | None = None,
) -> Path:
    """(Re)write ``<sweep dir>/study``; ``params`` maps each param to an example value,
    ``choices`` each choice param to its values."""
    run_dir = Path(sweep_dir) / STUDY_RUN
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("events.out.tfevents.*"):
        old.unlink(missing_ok=True)  # another sweep command may be rewriting it too
    hparams: dict[str, Any] = {"trial.state": "complete", "trial.number": 0}
    hparams.update({k: _example(v) for k, v in params.items()})
    hparams.update({k: v for k, v in config_hparams.items() if k not in hparams})
    # The dashboard shows the first five hparams by (not differs, name): the swept params and
    # trial.state must come before the constants. trial.number varies too but is left out, as
    # it would sort before trial.state and take its place.
    differs = {*params, "trial.state"}
    discrete: dict[str, Sequence[Any]] = {"trial.state": FINISHED_NAMES}
    for name, values in (choices or {}).items():
        # A string or bool choice (a config group: model=choice(mlp,cnn)) gets a checkbox
        # filter, as TensorBoard gives such hparams; numbers keep their min/max filter.
        if values and (
            all(isinstance(v, str) for v in values) or all(isinstance(v, bool) for v in values)
        ):
            discrete[name] = list(values)
    # It also shows the first five metrics in this order: the objectives first.
    tags = list(dict.fromkeys([*metrics, "trial/value", *metric_tags]))
    writer = SummaryWriter(str(run_dir))
    try:
        summary = experiment_summary(hparams, tags, differs=differs, discrete=discrete)
        writer._get_file_writer().add_summary(summary)
        _write_curves(writer, trials, metrics, directions)
        if leaderboard:
            writer.add_text("study/leaderboard", "```\n" + leaderboard + "\n```", 0)
    finally:
        writer.close()
    return run_dir


def _write_curves(
    writer: SummaryWriter, trials: Sequence[FrozenTrial], metrics: list[str], directions: list[str]
) -> None:
    done = [t for t in trials if t.datetime_complete is not None]
    done.sort(key=lambda t: t.datetime_complete)
    best: list[float | None] = [None] * len(metrics)
    counts = dict.fromkeys(FINISHED_NAMES, 0)
    for step, t in enumerate(done, start=1):
        walltime = t.datetime_complete.timestamp()
        counts[STATE_NAMES.get(t.state, STATE_NAMES[TrialState.FAIL])] += 1
        for name, n in counts.items():
            writer.add_scalar(f"study/n_{name}", n, step, walltime=walltime)
        values = t.values if t.values is not None else [None] * len(metrics)
        for i, (metric, direction) in enumerate(zip(metrics, directions)):
            suffix = "" if len(metrics) == 1 else f"/{metric}"
            v = values[i] if i < len(values) else None
            if v is not None and math.isfinite(v):
                writer.add_scalar(f"study/value{suffix}", v, step, walltime=walltime)
                better = best[i] is None or (
                    v > best[i] if direction == "maximize" else v < best[i]
                )
                if t.state == TrialState.COMPLETE and better:
                    best[i] = v
            if best[i] is not None:  # best so far, also across pruned and failed trials
                writer.add_scalar(f"study/best_value{suffix}", best[i], step, walltime=walltime)


def direction_names(study: optuna.Study) -> list[str]:
    return [
        "maximize" if d == optuna.study.StudyDirection.MAXIMIZE else "minimize"
        for d in study.directions
    ]
