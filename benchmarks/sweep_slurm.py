"""SLURM launcher mode against process mode: the same sweep, run both ways, alternately.

For each run: the time from the sweep command's launch to its first trial's start (process
mode: Hydra, the planning checks, the workers' imports; launcher mode: the same plus sbatch, the
scheduler starting the jobs and each job's own imports), and the sweep machinery's per-trial
overhead once workers run (the time between a worker's first trial start and last trial end not
spent inside ``engine.train.run``, per trial: claim, sample, compose, write, tell). Needs a SLURM
cluster the sweep can submit to (``scripts/slurm_local.sh start`` makes a one-node one).

    python benchmarks/sweep_slurm.py                   # 2 rounds, 12 trials, 2 workers
    python benchmarks/sweep_slurm.py --rounds 3 --trials 20 --out table.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import emit, run  # noqa: E402  (benchmarks/sweep.py: one sweep through the CLI, measured)

SLURM = [
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=30",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    common = [
        "search=random",
        f"search.n_trials={args.trials}",
        f"search.n_workers={args.workers}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.progress=none",
        "trainer.num_threads=1",
    ]
    results: dict[str, list[dict]] = {"processes": [], "slurm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternately, so that the machine's load hits both alike
            for mode, extra in (("processes", []), ("slurm", SLURM)):
                sweep_dir = Path(tmp) / f"{mode}_{r}"
                res = run(mode, sweep_dir, [*common, *extra])
                results[mode].append(res)
                print(
                    f"round {r + 1} {mode}: start-up {res['startup']:.2f} s, per-trial overhead "
                    f"{res['overhead']:.3f} s, wall {res['wall']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    def median(mode: str, key: str) -> float:
        return statistics.median(res[key] for res in results[mode])

    lines = [
        f"workload: digits + mlp, random, {args.trials} trials x {args.epochs} epochs, "
        f"{args.workers} workers, 1 thread each; {args.rounds} rounds, medians",
        "",
        "| | process mode | SLURM launcher mode | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("startup", "command to first trial running, s"),
        ("overhead", "per-trial overhead, s"),
        ("wall", "whole sweep, s"),
    ):
        p, s = median("processes", key), median("slurm", key)
        lines.append(f"| {label} | {p:.3f} | {s:.3f} | {s / p:.2f}x |")
    per_round = ", ".join(
        f"{a['startup']:.2f}/{b['startup']:.2f}"
        for a, b in zip(results["processes"], results["slurm"])
    )
    lines += ["", f"start-up per round (process/SLURM): {per_round} s"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
