"""Sweep benchmark: the same trial budget on the same workload, run two ways through the CLI.

(a) one worker process, no pruning; (b) the median pruner and 2 workers. For each: wall time,
best value, and for (b) the time at which it first matched (a)'s best value. Also the per-trial
overhead of the sweep machinery, from (a) (one worker, trials back to back): the time between
the first trial's start and the last trial's end that was not spent inside ``engine.train.run``
(claim, sample, compose, .hydra, TensorBoard session, tell), per trial; and the fixed start-up
(launch to first trial: Hydra, planning checks, the worker's imports).

    python benchmarks/sweep.py                      # 30 trials, tpe, digits + mlp, 30 epochs
    python benchmarks/sweep.py --trials 12 --epochs 8 --out table.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.search.storage import open_storage  # noqa: E402


def run(label: str, sweep_dir: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "engine.train", "-m", *args, f"hydra.sweep.dir={sweep_dir}"]
    started_at = dt.datetime.now()
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{label} failed:\n{result.stdout}\n{result.stderr}")
    study = optuna.load_study(
        study_name=sweep_dir.name, storage=open_storage(str(sweep_dir / "study.journal"))
    )
    trials = [t for t in study.get_trials() if t.datetime_complete is not None]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    first_start = min(t.datetime_start for t in trials)
    # Per worker: from its first trial's start to its last trial's end, trials back to back.
    by_worker: dict[int, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["worker"]["pid"], []).append(t)
    span = sum(
        (max(t.datetime_complete for t in ts) - min(t.datetime_start for t in ts)).total_seconds()
        for ts in by_worker.values()
    )
    inside = sum(t.user_attrs.get("run_seconds", 0.0) for t in trials)
    return {
        "label": label,
        "wall": wall,
        "best": max(t.value for t in complete),
        "trials": len(trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "startup": (first_start - started_at).total_seconds(),
        "span": span,
        "inside": inside,
        "overhead": (span - inside) / len(trials),
        "started_at": started_at,
        "complete": complete,
        "finished": trials,
    }


def emit(lines: list[str], out: str | None) -> None:
    """Print the table, and write it to ``out`` too when given."""
    text = "\n".join(lines)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


def first_match(res: dict, target: float) -> float | None:
    hits = sorted(t.datetime_complete for t in res["complete"] if t.value >= target - 1e-12)
    return (hits[0] - res["started_at"]).total_seconds() if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    common = [
        f"search={args.sampler}",
        f"search.n_trials={args.trials}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.progress=none",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        a = run("(a) 1 worker, no pruning", Path(tmp) / "a", [*common, "search.n_workers=1"])
        b = run(
            "(b) 2 workers, median pruner",
            Path(tmp) / "b",
            [*common, "search.n_workers=2", "search.pruner=median"],
        )
    match = first_match(b, a["best"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"workload: digits + mlp, {args.sampler}, {args.trials} trials x {args.epochs} epochs, "
        f"{cores} CPU cores",
        "",
        "| run | wall s | best val/acc | pruned | (b) matched (a)'s best at s | start-up s "
        "| per-trial overhead s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in (a, b):
        matched = "" if res is a else (f"{match:.1f}" if match is not None else "never")
        lines.append(
            f"| {res['label']} | {res['wall']:.1f} | {res['best']:.4f} | {res['pruned']} "
            f"| {matched} | {res['startup']:.1f} | {res['overhead']:.3f} |"
        )
    lines += [
        "",
        "per-trial overhead = (sum over workers of first-trial-start..last-trial-end - time inside "
        "engine.train.run) / trials;",
        f"(a): ({a['span']:.2f} s - {a['inside']:.2f} s) / {a['trials']} = {a['overhead']:.3f} s; "
        f"(b): ({b['span']:.2f} s - {b['inside']:.2f} s) / {b['trials']} = {b['overhead']:.3f} s",
        "start-up = launch of the command to the first trial's start (Hydra, planning checks, "
        "the workers' imports), once per sweep.",
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
