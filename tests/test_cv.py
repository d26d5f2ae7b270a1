"""Cross-validation (``trainer.cv_folds=k``): k fold run dirs, cv means and stds in metrics.json,
the console and TensorBoard, folds equal to scikit-learn's, a killed run resumed at its fold and
step, a CV sweep pruned per fold by WilcoxonPruner, and bad input refused.

One 3-fold digits run through the CLI (1 epoch, batch 128) is shared by the module; it is also
the uninterrupted reference of the resume test, which runs the same workload.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import optuna
import pytest
import tb_reader
from conftest import run_cli
from omegaconf import OmegaConf
from sklearn.model_selection import StratifiedKFold

from engine.data import split_table
from engine.task import Task

K = 3
# digits: 1,527 rows in train+val; a fold trains on 1,018 of them, 8 steps of batch 128. A
# checkpoint every step: the save of step n is on disk once step n + 1's save has started (one
# save in flight), so a kill before step s always leaves step s - 2 or later to resume from.
WORKLOAD = [
    f"trainer.cv_folds={K}",
    "trainer.max_epochs=1",
    "trainer.ckpt_every_n_steps=1",
    "trainer.device=cpu",
    "trainer.progress=none",
    "model.hidden=32",
    "data.batch_size=128",
    "optim.lr=0.01",
]
TASK_NAMES = Task("classification", 10).metric_names()  # digits: 10 classes


def metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cv") / "run"
    result = run_cli(*WORKLOAD, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result.stdout


def test_each_fold_is_a_run_dir_and_the_cv_metrics_are_their_mean_and_sample_std(cv_run):
    run_dir, _ = cv_run
    folds = [metrics(run_dir / f"fold_{i}") for i in range(K)]
    for i in range(K):
        fold = run_dir / f"fold_{i}"
        for part in ("checkpoints/best.pt", "checkpoints/last.pt", "data_card.json", "train.log"):
            assert (fold / part).exists(), f"fold_{i}/{part}"
    cv = metrics(run_dir)
    names = [f"{split}/{name}" for split in ("val", "test") for name in ["loss", *TASK_NAMES]]
    for name in names:
        values = np.array([f[name] for f in folds])
        assert cv[f"cv/{name}_mean"] == pytest.approx(values.mean(), rel=1e-12), name
        assert cv[f"cv/{name}_std"] == pytest.approx(values.std(ddof=1), rel=1e-12), name
        assert [cv[f"cv/fold_{i}/{name}"] for i in range(K)] == list(values)
    assert 0.5 < cv["cv/val/acc_mean"] < 1.0 and cv["cv/val/acc_std"] > 0


def test_the_console_prints_mean_std_and_each_fold(cv_run):
    run_dir, stdout = cv_run
    cv = metrics(run_dir)
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric") and "mean" in line)
    assert header.split() == ["metric", "mean", "std", "fold", "0", "fold", "1", "fold", "2"]
    row = next(line for line in lines if line.startswith("val/acc ")).split()
    expected = [cv["cv/val/acc_mean"], cv["cv/val/acc_std"]]
    expected += [cv[f"cv/fold_{i}/val/acc"] for i in range(K)]
    assert [float(v) for v in row[1:]] == pytest.approx(expected, abs=1e-4)


def test_tensorboard_has_the_cv_scalars_and_an_hparams_session_with_them(cv_run):
    run_dir, _ = cv_run
    cv = metrics(run_dir)
    acc = tb_reader.load(run_dir / "tb")
    (mean,) = acc.Scalars("cv/val/acc_mean")
    assert mean.value == pytest.approx(cv["cv/val/acc_mean"], rel=1e-6) and mean.step == K
    per_fold = acc.Scalars("cv/fold/val/acc")
    assert [e.step for e in per_fold] == list(range(K))
    assert [e.value for e in per_fold] == pytest.approx(
        [cv[f"cv/fold_{i}/val/acc"] for i in range(K)]
    )
    records = tb_reader.hparams(acc)
    shown = [m.name.tag for m in records["_hparams_/experiment"].experiment.metric_infos]
    assert {"cv/val/acc_mean", "cv/val/acc_std", "cv/test/acc_mean"} <= set(shown)
    assert records["_hparams_/session_start_info"].session_start_info.hparams["trainer.cv_folds"]


def test_fold_membership_equals_stratified_kfold_on_the_same_rows(cv_run):
    run_dir, _ = cv_run
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    table = split_table(cfg.data)
    pool = np.sort(np.concatenate([table.train, table.val]))
    splitter = StratifiedKFold(n_splits=K, shuffle=True, random_state=cfg.data.split_seed)
    expected = [np.sort(pool[val]) for _, val in splitter.split(pool, table.y[pool])]
    for i in range(K):
        fold = json.loads((run_dir / f"fold_{i}" / "fold.json").read_text())
        assert fold["val"] == expected[i].tolist()
        assert fold["train"] == np.setdiff1d(pool, expected[i]).tolist()
        assert fold["test"] == table.test.tolist()
        # Standardised on the fold's own training rows only.
        info = json.loads((run_dir / f"fold_{i}" / "data_info.json").read_text())
        mean = table.x[np.array(fold["train"])].mean(axis=0)
        assert info["feature_mean"] == pytest.approx(mean.tolist(), rel=1e-5, abs=1e-6)


def test_killed_mid_fold_twice_resumes_each_fold_where_it_was_and_ends_equal(cv_run, tmp_path):
    """Kill 1: fold 0 before step 7 (its last.pt is from step 5 or 6). Kill 2: fold 0 resumes
    there and finishes, never reaching a step 4; fold 1 dies before its step 4. The last run
    skips fold 0, resumes fold 1 (from step 2 or 3) and trains fold 2."""
    reference, _ = cv_run
    run_dir = tmp_path / "run"
    args = [*WORKLOAD, f"hydra.run.dir={run_dir}"]
    first = run_cli(*args, env={"ENGINE_FAULT_KILL_AT_STEP": "7"})
    assert first.returncode == -signal.SIGKILL, first.stdout + first.stderr
    assert not (run_dir / "fold_0" / "metrics.json").exists()
    second = run_cli(*args, env={"ENGINE_FAULT_KILL_AT_STEP": "4"})
    assert second.returncode == -signal.SIGKILL, second.stdout + second.stderr
    assert "resumed from" in second.stdout and (run_dir / "fold_0" / "metrics.json").exists()
    assert not (run_dir / "fold_1" / "metrics.json").exists()
    last = run_cli(*args)
    assert last.returncode == 0, last.stdout + last.stderr
    assert "cv fold 1/3: finished before, skipped" in last.stdout
    assert "cv fold 2/3: finished before" not in last.stdout
    assert "resumed from" in (run_dir / "fold_1" / "train.log").read_text()
    assert metrics(run_dir) == metrics(reference)


def test_a_cv_sweep_reports_each_fold_and_wilcoxon_prunes_the_bad_trial(tmp_path):
    """Grid order: trial 0 (lr 0.01) completes and is the best; trial 1 (lr 1e-6, chance level)
    is worse on folds 0 and 1, the smallest p a signed-rank test of 2 pairs gives is 0.25, below
    the threshold 0.3: pruned after its 2nd fold, and fold 2 is never trained."""
    s = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "search=grid",
        "optim.lr=choice(0.01,1e-6)",
        "search.pruner=wilcoxon",
        "search.wilcoxon_p_threshold=0.3",
        "search.n_workers=1",
        *[a for a in WORKLOAD if not a.startswith("optim.lr")],
        "trainer.num_threads=1",
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(s / "study.journal"))
    )
    (name,) = optuna.get_all_study_names(storage)
    good, bad = optuna.load_study(study_name=name, storage=storage).trials
    assert good.state == optuna.trial.TrialState.COMPLETE
    folds = [metrics(s / "trial_0" / f"fold_{i}")["val/acc"] for i in range(K)]
    assert good.intermediate_values == dict(enumerate(folds))
    assert good.value == pytest.approx(metrics(s / "trial_0")["cv/val/acc_mean"])
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert list(bad.intermediate_values) == [0, 1]
    assert not (s / "trial_1" / "fold_2").exists()
    assert "pruned after fold 2" in (s / "trial_1" / "train.log").read_text()


@pytest.mark.parametrize(
    "args, named",
    [
        (["trainer.cv_folds=1"], "trainer.cv_folds=1"),
        (["trainer.cv_folds=2", "data=text"], "data=text"),
        (["trainer.cv_folds=3", "data=csv", "data.target=label", "data.path=ROWS"], "'rare'"),
    ],
    ids=["one-fold", "text", "rare-class"],
)
def test_bad_cv_input_is_an_error_naming_it_with_exit_code_2(tmp_path, args, named):
    table = tmp_path / "rows.csv"
    lines = ["a,b,label"] + [f"{i},{i % 7},common" for i in range(60)]
    lines += ["1,1,rare", "2,2,rare"]  # 2 rows, fewer than 3 folds
    table.write_text("\n".join(lines) + "\n")
    args = [a.replace("ROWS", str(table)) for a in args]
    result = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    console = result.stdout + result.stderr
    assert result.returncode == 2, console
    error = next(line for line in console.splitlines() if line.startswith("error:"))
    assert "trainer.cv_folds" in error and named in error
    assert not (tmp_path / "run" / "fold_0").exists()
