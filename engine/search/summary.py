"""A sweep's results, read from its study: summary.csv, best.yaml, pareto.csv, the leaderboard.

- ``summary.csv``: a row per trial (waiting slots left out): number, state (complete, pruned,
  failed, running, or interrupted for a trial whose worker died and that was retried), value
  (one column per metric with several objectives), duration, one ``params_<name>`` column per
  param, the trial's final metrics, fail reason, retry link and run dir.
- ``best.yaml``: the best complete trial's full config, runnable as
  ``python -m engine.train --config-dir <sweep dir> --config-name best``. With several objectives:
  the Pareto-optimal trial best on the first metric, and ``pareto.csv`` lists the whole front.
- The leaderboard: the top complete trials (or the Pareto front) as a text table.

``python -m engine.search.summary --storage URL --study NAME [--sweep-dir DIR]`` rewrites them
(and the study-level TensorBoard run) for a study whose workers ran elsewhere.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from engine.checkpoint import replace_file
from engine.search import storage as st
from engine.search.spec import Spec
from engine.search.tb import write_study_run

TOP = 10


def _seconds(t: FrozenTrial) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _fmt(value: Any) -> str:
    """For the leaderboard: 6 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _cell(value: Any) -> str:
    """For summary.csv: exact (the shortest text that reads back to the same float)."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


def ranked(trials: Sequence[FrozenTrial], spec: Spec) -> list[FrozenTrial]:
    """Complete trials, best first (single objective)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values]
    sign = -1.0 if spec.directions[0] == "maximize" else 1.0
    return sorted(done, key=lambda t: (sign * t.values[0], t.number))


def best_trial(study: optuna.Study, spec: Spec) -> FrozenTrial | None:
    trials = study.get_trials(deepcopy=False)
    if len(spec.metrics) == 1:
        top = ranked(trials, spec)
        return top[0] if top else None
    front = pareto_front(study)
    if not front:
        return None
    sign = -1.0 if spec.directions[0] == "maximize" else 1.0
    return min(front, key=lambda t: (sign * t.values[0], t.number))


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    try:
        return sorted(study.best_trials, key=lambda t: t.number)
    except ValueError:
        return []


def trial_dir(t: FrozenTrial, spec: Spec, sweep_dir: Path) -> Path:
    """The trial's run dir: under this sweep dir (which may have been moved), else where its
    worker wrote it."""
    here = Path(sweep_dir) / spec.subdir.format(number=t.number)
    return here if here.exists() else Path(t.user_attrs.get("run_dir", here))


def write_csv(path: Path, trials: Sequence[FrozenTrial], spec: Spec) -> None:
    rows = [t for t in trials if t.state != TrialState.WAITING]
    rows.sort(key=lambda t: t.number)
    params = list(spec.space)
    for t in rows:  # params of earlier spaces (a resumed sweep may have changed it)
        params += [p for p in t.params if p not in params]
    metric_keys = sorted({k for t in rows for k in t.user_attrs.get("metrics", {})})
    values = ["value"] if len(spec.metrics) == 1 else list(spec.metrics)
    header = ["number", "state", *values, "duration_s"]
    header += [f"params_{p}" for p in params] + metric_keys
    header += ["fail_reason", "retry_of", "run_dir"]
    with io.StringIO(newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for t in rows:
            vals = list(t.values) if t.values else [None] * len(values)
            metrics = t.user_attrs.get("metrics", {})
            seconds = _seconds(t)
            out.writerow(
                [t.number, st.state_name(t), *map(_cell, vals)]
                + [f"{seconds:.3f}" if seconds is not None else ""]
                + [_cell(t.params.get(p)) for p in params]
                + [_cell(metrics.get(k)) for k in metric_keys]
                + [
                    t.user_attrs.get("fail_reason", ""),
                    _cell(t.user_attrs.get("retry_of")),
                    str(trial_dir(t, spec, path.parent)),
                ]
            )
        replace_file(path, f.getvalue())


_INTERPOLATION = re.compile(r"(\\*)\$\{")


def escape_interpolations(text: str) -> str:
    """The YAML value that OmegaConf reads back as exactly ``text``: each ``${`` becomes the
    escaped ``\\${``, and the backslashes right before it are doubled (OmegaConf reads ``\\\\``
    there as one backslash). Backslashes anywhere else are read as they are."""
    return _INTERPOLATION.sub(lambda m: m.group(1) * 2 + "\\${", text)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return escape_interpolations(value)
    if isinstance(value, dict):
        return {k: _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v) for v in value]
    return value


def write_best_yaml(path: Path, t: FrozenTrial, spec: Spec, sweep_dir: Path) -> bool:
    """The trial's composed config, resolved, as a primary config; False if it has none."""
    source = trial_dir(t, spec, sweep_dir) / ".hydra" / "config.yaml"
    if not source.exists():
        return False
    # Resolved, each value is what the trial ran with; a string that held an escaped ${...}
    # (a file name with "${" in it) is escaped again, or loading best.yaml would resolve it.
    cfg = _escaped(OmegaConf.to_container(OmegaConf.load(source), resolve=True))
    cfg["search"] = None
    # The primary config's defaults bring the schema (train_schema) and the hydra settings
    # (run dir, logging); _self_ then sets every key to the trial's value.
    parent = spec.config_name if spec.config_name != "best" else "train_schema"
    body = OmegaConf.create({"defaults": [parent, "_self_"], **cfg})
    values = ", ".join(f"{m}={v:.6g}" for m, v in zip(spec.metrics, t.values or []))
    header = (
        f"# Best trial of the sweep: trial {t.number} ({values}).\n"
        f"# Reproduce it: python -m engine.train --config-dir {sweep_dir} --config-name best\n"
    )
    replace_file(path, header + OmegaConf.to_yaml(body))
    return True


def leaderboard(study: optuna.Study, spec: Spec) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = dict.fromkeys((*st.FINISHED_NAMES, "running", st.INTERRUPTED), 0)
    for t in trials:
        name = st.state_name(t)
        if name in counts:
            counts[name] += 1
    finished = sum(counts[name] for name in st.FINISHED_NAMES)
    head = f"{finished} trials finished: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if len(spec.metrics) == 1:
        rows = ranked(trials, spec)[:TOP]
        title = f"top {len(rows)} by {spec.metrics[0]} ({spec.directions[0]})"
    else:
        rows = pareto_front(study)
        title = (
            f"Pareto front ({', '.join(f'{m} {d}' for m, d in zip(spec.metrics, spec.directions))})"
        )
    if not rows:
        return head + "\nno trial completed."
    params = list(spec.space)
    names = ["#", "trial", *spec.metrics, *params, "seconds"]
    table = []
    for rank, t in enumerate(rows, start=1):
        table.append(
            [str(rank), str(t.number)]
            + [_fmt(v) for v in t.values]
            + [_fmt(t.params.get(p)) for p in params]
            + [f"{_seconds(t) or 0:.1f}"]
        )
    widths = [max(len(n), *(len(r[i]) for r in table)) for i, n in enumerate(names)]
    lines = [head, title]
    lines.append("  ".join(n.rjust(w) for n, w in zip(names, widths)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    return "\n".join(lines)


def _config_hparams(run_dir: Path | None) -> dict[str, Any]:
    from engine.tb import flatten

    if run_dir is None or not (run_dir / ".hydra" / "config.yaml").exists():
        return {}
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    flat = flatten(cfg)
    return {k: v for k, v in flat.items() if not k.startswith("search")}


def write_all(study: optuna.Study, spec: Spec, sweep_dir: Path) -> tuple[str, FrozenTrial | None]:
    """Write summary.csv, best.yaml (+ pareto.csv), the study TensorBoard run; return the
    leaderboard text and the best trial."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    write_csv(sweep_dir / "summary.csv", trials, spec)
    best = best_trial(study, spec)
    if best is not None:
        write_best_yaml(sweep_dir / "best.yaml", best, spec, sweep_dir)
    if len(spec.metrics) > 1:
        write_csv(sweep_dir / "pareto.csv", pareto_front(study), spec)
    board = leaderboard(study, spec)
    sample = best or next((t for t in trials if t.state == TrialState.COMPLETE), None)
    run_dir = trial_dir(sample, spec, sweep_dir) if sample is not None else None
    space = spec.params()
    examples = {name: p.choices[0] if p.kind == "choice" else p.low for name, p in space.items()}
    write_study_run(
        sweep_dir,
        trials,
        metrics=spec.metrics,
        directions=spec.directions,
        params=examples,
        config_hparams=_config_hparams(run_dir),
        metric_tags=spec.metric_tags,
        leaderboard=board,
        choices={name: p.choices for name, p in space.items() if p.kind == "choice"},
    )
    return board, best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.search.summary",
        description="Write summary.csv, best.yaml and the study TensorBoard run of a sweep.",
    )
    parser.add_argument(
        "--storage",
        help=f"Optuna URL, or a journal file path (default: ${st.STORAGE_ENV}, the way to pass a "
        f"URL with a password)",
    )
    parser.add_argument("--study", required=True, help="study name (search.study_name)")
    parser.add_argument("--sweep-dir", help="where to write (default: the study's sweep dir)")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = st.open_storage(st.resolve_storage(args.storage))
        study = optuna.load_study(study_name=args.study, storage=storage)
        spec = st.load_spec(storage, storage.get_study_id_from_name(args.study))
    except (KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    board, _ = write_all(study, spec, Path(args.sweep_dir or spec.sweep_dir))
    print(board)
    return 0


if __name__ == "__main__":
    sys.exit(main())
