"""Sweeps through the real CLI (`python -m engine.train -m search=...`), read back from disk.

Workloads are tiny (digits or wine, 2-8 epochs, batch 128, one torch thread per trial) so the
whole file runs in about two minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

FAST = ["data.batch_size=128", "trainer.progress=none", "trainer.num_threads=1"]


def rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def states(sweep_dir: Path) -> list[str]:
    return [r["state"] for r in rows(sweep_dir)]


def sweep(cli, *args: str, timeout: float = 300):
    return cli("-m", *args, timeout=timeout)


@pytest.mark.slow
def test_tpe_with_median_pruning_then_best_yaml_reproduces_then_resume_adds_exactly_two(
    cli, tmp_path
):
    """Acceptance 1 and 2."""
    s = tmp_path / "S"
    args = ["search=tpe", "search.pruner=median", "trainer.max_epochs=8", *FAST]
    first = sweep(cli, *args, "search.n_trials=12", f"hydra.sweep.dir={s}")
    assert first.returncode == 0, first.stdout + first.stderr
    table = rows(s)
    assert [int(r["number"]) for r in table] == list(range(12))
    assert {r["state"] for r in table} <= {"complete", "pruned"}
    assert 1 <= sum(r["state"] == "pruned" for r in table) < 12
    for r in table:  # a full run dir per trial; a pruned trial keeps its last reported value
        run_dir = s / f"trial_{r['number']}"
        assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "train.log").exists()
        assert (run_dir / "checkpoints" / "last.pt").exists() and list((run_dir / "tb").iterdir())
        assert r["value"] and 0.0 <= float(r["value"]) <= 1.0
        assert (run_dir / "metrics.json").exists() == (r["state"] == "complete")
    assert (s / "study.journal").exists() and (s / "study").is_dir()
    best = max((r for r in table if r["state"] == "complete"), key=lambda r: float(r["value"]))
    assert "top" in first.stdout and f"best: trial {best['number']}" in first.stdout
    config = yaml.safe_load((s / "best.yaml").read_text())
    assert config["defaults"] == ["train", "_self_"] and config["search"] is None

    again = cli("--config-dir", str(s), "--config-name", "best", f"hydra.run.dir={tmp_path / 'b'}")
    assert again.returncode == 0, again.stderr
    value = json.loads((tmp_path / "b" / "metrics.json").read_text())["val/acc"]
    assert value == pytest.approx(float(best["value"]), abs=1e-6)

    resumed = sweep(cli, *args, "search.n_trials=14", f"hydra.sweep.dir={s}")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "12 done, 2 to run" in resumed.stdout
    assert [int(r["number"]) for r in rows(s)] == list(range(14))
    ran = [line for line in resumed.stdout.splitlines() if line.startswith("[sweep] trial ")]
    assert [line.split()[2] for line in ran] == ["12", "13"]
    assert (s / "trial_13" / ".hydra").exists()


def test_grid_with_two_workers_runs_each_combination_exactly_once(cli, tmp_path):
    """Acceptance 3."""
    s = tmp_path / "S"
    result = sweep(
        cli,
        "search=grid",
        "optim.lr=choice(1e-3,1e-2)",
        "model.hidden=choice(16,32,64)",
        "search.n_workers=2",
        "trainer.max_epochs=2",
        *FAST,
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 workers" in result.stdout
    combos = [(r["params_optim.lr"], r["params_model.hidden"]) for r in rows(s)]
    assert sorted(combos) == sorted((lr, h) for lr in ("0.001", "0.01") for h in ("16", "32", "64"))
    assert states(s) == ["complete"] * 6


def test_hyperband_prunes_in_the_middle_of_a_trial(cli, tmp_path):
    """(median: the first test; none, the default: the sampler tests.)"""
    s = tmp_path / "hb"
    common = ["search=random", "search.n_trials=8", "trainer.max_epochs=9", *FAST]
    result = sweep(cli, *common, "search.pruner=hyperband", f"hydra.sweep.dir={s}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pruned" in states(s) and "complete" in states(s)
    pruned = next(r for r in rows(s) if r["state"] == "pruned")
    log = (s / f"trial_{pruned['number']}" / "train.log").read_text()
    epoch = int(log.split("pruned after epoch ")[1].split()[0])
    assert 1 <= epoch < 9 and not (s / f"trial_{pruned['number']}" / "metrics.json").exists()


def test_failing_and_nan_trials_are_recorded_as_failed_and_the_sweep_completes(cli, tmp_path):
    """Acceptance 4: cnn on tabular data raises ValueError; lr=1e8 without clipping gives NaN."""
    s = tmp_path / "S"
    result = sweep(
        cli,
        "search=grid",
        "data=wine",
        "model=choice(mlp,cnn)",
        "optim.lr=choice(1e-2,1e8)",
        "model.hidden=64",  # fixes the preset's model.hidden: 2 x 2 = 4 trials
        "trainer.grad_clip=0",
        "trainer.max_epochs=3",
        *FAST,
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    by = {(r["params_model"], r["params_optim.lr"]): r for r in rows(s)}
    assert by[("mlp", "0.01")]["state"] == "complete"
    for lr in ("0.01", "100000000.0"):
        assert by[("cnn", lr)]["state"] == "failed"
        assert "model=cnn needs image-shaped data" in by[("cnn", lr)]["fail_reason"]
    nan = by[("mlp", "100000000.0")]
    assert nan["state"] == "failed" and nan["fail_reason"].startswith("NonFiniteError: non-finite")
    log = (s / f"trial_{nan['number']}" / "train.log").read_text()
    assert "Traceback" in log and "NonFiniteError" in log
    assert "4 trials finished: 1 complete, 3 failed" in result.stdout


def test_max_failures_stops_a_sweep_that_fails_everywhere(cli, tmp_path):
    """Also run from outside the repo: Hydra finds the sweeper in the installed package."""
    s = tmp_path / "S"
    result = cli(
        "-m",
        "search=random",
        "data=wine",
        "model=cnn",
        "search.n_trials=6",
        "search.max_failures=2",
        "trainer.max_epochs=2",
        *FAST,
        f"hydra.sweep.dir={s}",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "the sweep stopped: 2 trials in a row failed (search.max_failures=2)" in result.stdout
    assert "model=cnn needs image-shaped data" in result.stdout
    assert states(s) == ["failed", "failed"]  # one worker: it stops right after the 2nd failure


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=interval(1e-2,1e-4)", "optim.lr=interval(1e-2,1e-4) is empty"),
        ("model.dropout=interval(0,1.5)", "model.dropout=1.5 is invalid"),
        ("model=choice(mlp,cnnn)", "Could not find 'model/cnnn'"),
        ("model.hiden=choice(8,16)", "Did you mean 'model.hidden'?"),
        ("search.sampler=tpee", "Did you mean 'tpe'?"),
    ],
)
def test_a_bad_space_or_setting_fails_before_any_compute(cli, tmp_path, override, message):
    s = tmp_path / "S"
    result = sweep(cli, "search=random", override, f"hydra.sweep.dir={s}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert not list(s.glob("trial_*"))


def test_an_empty_space_fails_before_any_compute(cli, tmp_path):
    presets = tmp_path / "conf" / "search"
    presets.mkdir(parents=True)
    (presets / "empty.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: engine\n"
        "search:\n  sampler: tpe\n  params: {}\n"
    )
    s = tmp_path / "S"
    result = sweep(
        cli, "--config-dir", str(tmp_path / "conf"), "search=empty", f"hydra.sweep.dir={s}"
    )
    assert result.returncode == 2
    assert "the search space is empty" in result.stderr and not s.exists()
