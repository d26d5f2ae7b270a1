"""Cross-validation sweep benchmark: the same CV sweep with WilcoxonPruner and without pruning.

Each trial is a k-fold CV run (``trainer.cv_folds``) scored by ``cv/val/acc_mean``; the space
(log-uniform learning rate over 4 decades, two widths) has many configs that a few folds show to
be bad. The random sampler draws the same params for trial N in every run (it is seeded with
``search.seed + N`` and ignores the history), so the runs differ only in what the pruner stops.
One worker, so which trial is the best when a pruning decision is made is the same every time.

For each run: trials completed / pruned, folds trained, wall time of the sweep command, the best
value (and whether it is the same trial), and the wall-time ratio against no pruning.

    python benchmarks/cv_sweep.py                       # digits, 5 folds, 16 trials, 20 epochs
    python benchmarks/cv_sweep.py --trials 8 --folds 3 --out table.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from optuna.trial import TrialState

# benchmarks/sweep.py: one sweep through the CLI, measured (it puts the repo on sys.path)
from sweep import run  # noqa: E402


def sweep(label: str, sweep_dir: Path, args: list[str]) -> dict:
    measured = run(label, sweep_dir, args)
    trials, complete = measured["finished"], measured["complete"]
    best = max(complete, key=lambda t: t.value)
    return {
        "label": label,
        "wall": measured["wall"],
        "complete": len(complete),
        "pruned": measured["pruned"],
        # A fold with a metrics.json was trained to its end (a pruned trial stops after one).
        "folds": len(list(sweep_dir.glob("trial_*/fold_*/metrics.json"))),
        "best": best.value,
        # Inside engine.train.run, all trials: the folds' own cost without the fixed start-up.
        "inside": measured["inside"],
        "best_trial": best.number,
        "pruned_at": sorted(
            len(t.intermediate_values) for t in trials if t.state == TrialState.PRUNED
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--p-thresholds",
        default="0.1,0.3",
        help="search.wilcoxon_p_threshold values to run, comma-separated (0.1 is Optuna's default)",
    )
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    common = [
        "data=digits",
        "search=random",
        f"search.seed={args.seed}",
        f"search.n_trials={args.trials}",
        "search.n_workers=1",
        f"trainer.cv_folds={args.folds}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.device=cpu",
        "trainer.progress=none",
        "data.batch_size=128",
        "optim.lr=tag(log,interval(1e-6,1e-1))",
        "model.hidden=choice(16,64)",
    ]
    runs = [("none", ["search.pruner=none"])]
    for p in args.p_thresholds.split(","):
        runs.append(
            (f"wilcoxon p<{p}", ["search.pruner=wilcoxon", f"search.wilcoxon_p_threshold={p}"])
        )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(runs):
            results.append(sweep(label, Path(tmp) / f"cv_sweep_{i}", [*common, *extra]))
            print(f"{label}: {results[-1]['wall']:.1f} s", file=sys.stderr, flush=True)
    base = results[0]
    lines = [
        f"workload: digits + mlp, random (seed {args.seed}), {args.trials} trials x "
        f"{args.folds} folds x {args.epochs} epochs, 1 worker; objective cv/val/acc_mean",
        "",
        "| pruner | complete / pruned | pruned after folds | folds trained | wall, s "
        "| in trials, s | best cv/val/acc_mean (trial) | wall vs none | in trials vs none |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['complete']} / {r['pruned']} | "
            f"{','.join(map(str, r['pruned_at'])) or '-'} | {r['folds']} | {r['wall']:.1f} | "
            f"{r['inside']:.1f} | {r['best']:.4f} ({r['best_trial']}) | "
            f"{r['wall'] / base['wall']:.2f}x | {r['inside'] / base['inside']:.2f}x |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
