"""TensorBoard output of a sweep: one HPARAMS session per trial, and a study-level run.

- Each trial's ``tb/`` gets its HPARAMS session when the trial ends (start and end together, so
  ``trial.state`` can be an hparam: complete, pruned or failed), its params and flattened config
  as hparams, its status (success; unknown for pruned, as the API has no "pruned"; failure), and a
  ``trial/value`` scalar (the objective, or the last reported value of a pruned trial).
- ``<sweep dir>/study/`` holds the one experiment summary of the sweep (which hparams and metrics
  the dashboard shows as columns, ``trial.state`` and the params first) and the study's curves
  over finished trials: ``study/value``, ``study/best_value`` (best so far), the running counts of
  complete, pruned and failed trials, and the leaderboard as text. It is rewritten whole each time
  the sweep command ends, so a resumed sweep has one curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch.utils.tensorboard import SummaryWriter

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
) -> Path:
    """(Re)write ``<sweep dir>/study``; ``params`` maps each param to an example value."""
    run_dir = Path(sweep_dir) / STUDY_RUN
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in run_dir.glob("events.out.tfevents.*"):
        old.unlink()
    hparams: dict[str, Any] = {"trial.state": "complete", "trial.number": 0}
    hparams.update({k: _example(v) for k, v in params.items()})
    hparams.update({k: v for k, v in config_hparams.items() if k not in hparams})
    tags = ["trial/value", *[t for t in metric_tags if t != "trial/value"]]
    writer = SummaryWriter(str(run_dir))
    try:
        writer._get_file_writer().add_summary(experiment_summary(hparams, tags))
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
    counts = {"complete": 0, "pruned": 0, "failed": 0}
    for step, t in enumerate(done, start=1):
        walltime = t.datetime_complete.timestamp()
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(
            t.state, "failed"
        )
        counts[state] += 1
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
