"""Pruning happens where the README says: Hyperband at its rungs (epochs counted from 1, as its
``min_resource`` is), median from the second epoch on, and never at a trial's final epoch."""

from __future__ import annotations

import csv
import json
import random

import optuna
import pytest

from engine.search.pruners import Pruned, Reporter, make_pruner

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _simulate(pruner: optuna.pruners.BasePruner, max_epochs: int, n_trials: int) -> list[int]:
    """Run trials through the Reporter as the trainer calls it; return, per trial, the epoch
    (1-based) after which it was pruned, or 0 when it ran to the end."""
    study = optuna.create_study(direction="maximize", pruner=pruner)
    rng = random.Random(0)
    outcome = []
    for _ in range(n_trials):
        trial = study.ask()
        reporter = Reporter(trial, ["val/acc"])
        quality = rng.random()
        try:
            for epoch in range(max_epochs):
                value = quality * (epoch + 1) / max_epochs + 0.01 * rng.random()
                reporter(epoch, {"val/acc": value}, final=epoch + 1 == max_epochs)
        except Pruned as pruned:
            outcome.append(pruned.epoch + 1)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            continue
        outcome.append(0)
        study.tell(trial, value)
    return outcome


def test_hyperband_prunes_only_at_optunas_rungs_and_never_at_the_final_epoch():
    max_epochs = 9
    pruner = make_pruner("hyperband", max_epochs)
    pruned_after = _simulate(pruner, max_epochs, n_trials=40)
    # Optuna's own rung arithmetic: bracket b's successive-halving pruner promotes at
    # min_resource * reduction_factor ** (min_early_stopping_rate + rung).
    rungs = {
        sh._min_resource * sh._reduction_factor ** (sh._min_early_stopping_rate + rung)
        for sh in pruner._pruners
        for rung in range(8)
    }
    assert len(pruner._pruners) == 3  # floor(log3(9 / 1)) + 1 brackets
    assert {1, 3, 9} <= rungs
    stops = {epoch for epoch in pruned_after if epoch}
    assert stops, "some trials should have been pruned"
    assert stops <= rungs - {max_epochs}, f"pruned after epochs {sorted(stops)}"


def test_median_prunes_from_the_second_epoch_and_never_at_the_final_one():
    pruned_after = _simulate(make_pruner("median", 4), 4, n_trials=30)
    stops = {epoch for epoch in pruned_after if epoch}
    assert stops and stops <= {2, 3}


@pytest.mark.slow
def test_a_hyperband_sweep_keeps_the_metrics_of_every_trial_that_reached_its_last_epoch(
    cli, tmp_path
):
    """trainer.max_epochs=2: Hyperband's only rung below the end is epoch 1; a trial that got
    past it runs to the end and writes metrics.json with its test metrics."""
    s = tmp_path / "S"
    result = cli(
        "-m",
        "search=grid",
        "optim.lr=choice(3e-3,1e-5,3e-6,1e-6)",
        "model.hidden=64",
        "search.pruner=hyperband",
        "trainer.max_epochs=2",
        "data.batch_size=128",
        "trainer.progress=none",
        "trainer.num_threads=1",
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with (s / "summary.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4
    states = [r["state"] for r in table]
    assert "pruned" in states, states
    for r in table:
        run_dir = s / f"trial_{r['number']}"
        log = (run_dir / "train.log").read_text()
        if r["state"] == "pruned":
            assert "pruned after epoch 1 " in log
        else:
            assert r["state"] == "complete"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert "test/acc" in metrics
