"""Workers, storages and recovery with real processes: a SIGKILLed sweep resumed to the exact
count, a standalone worker joining a running sweep, workers as Hydra launcher jobs, SQLite and
PostgreSQL storages."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from conftest import REPO
from optuna.trial import TrialState

from engine.search.storage import open_storage

FAST = ["data.batch_size=128", "trainer.progress=none", "trainer.num_threads=1"]
optuna.logging.set_verbosity(optuna.logging.WARNING)


def rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as f:
        return list(csv.DictReader(f))


def load(storage: str, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage))
    except KeyError:
        return None


def popen(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slow
def test_a_sigkilled_sweep_rerun_keeps_finished_trials_and_retries_the_interrupted(cli, tmp_path):
    """Issue 6: kill -9 the driver and its workers mid-sweep, re-run the same command."""
    s = tmp_path / "S"
    args = [
        "search=random",
        "search.n_trials=6",
        "search.n_workers=2",
        "model.hidden=256",
        "trainer.max_epochs=40",
        *FAST,
        f"hydra.sweep.dir={s}",
    ]
    driver = popen("engine.train", "-m", *args, start_new_session=True)
    journal = str(s / "study.journal")

    def mid_sweep():
        study = load(journal, "S") if Path(journal).exists() else None
        if study is None:
            return None
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        running = [t for t in trials if t.state == TrialState.RUNNING and t.params]
        return (done, running) if len(done) >= 2 and running else None

    try:
        done, running = wait_for(mid_sweep, 180, "2 complete trials and 1 running")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and both workers, mid-trial
        driver.wait()
    before = {
        t.number: t.values
        for t in load(journal, "S").get_trials()
        if t.state == TrialState.COMPLETE
    }
    assert len(before) >= 2

    again = cli("-m", *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "had been interrupted: failed, and retried now" in again.stdout
    trials = load(journal, "S").get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6  # the exact count
    for number, values in before.items():  # finished trials were kept, not re-run
        assert trials[number].state == TrialState.COMPLETE and trials[number].values == values
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert {t.number for t in running} <= {t.number for t in interrupted}
    for t in interrupted:
        assert t.state == TrialState.FAIL
        retry = next(r for r in trials if r.user_attrs.get("retry_of") == t.number)
        assert retry.state == TrialState.COMPLETE
        # Every value the interrupted trial had drawn is repeated; a trial killed while drawing
        # its params draws the rest in the retry.
        assert retry.params.items() >= t.params.items()
    table = rows(s)
    assert sum(r["state"] == "complete" for r in table) == 6
    assert sum(r["state"] == "interrupted" for r in table) == len(interrupted)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow
def test_a_standalone_worker_joins_a_running_sweep_and_the_count_stays_exact(tmp_path):
    s = tmp_path / "S"
    driver = popen(
        "engine.train",
        "-m",
        "search=random",
        "search.n_trials=8",
        "search.n_workers=1",
        "model.hidden=256",
        "trainer.max_epochs=30",
        *FAST,
        f"hydra.sweep.dir={s}",
    )
    journal = str(s / "study.journal")
    wait_for(lambda: Path(journal).exists() and load(journal, "S"), 60, "the study")
    # scripts/attach_workers.sh, the README's way to add workers to a running study by hand.
    worker = subprocess.run(
        ["bash", str(REPO / "scripts" / "attach_workers.sh"), "S", "1"],
        cwd=REPO,
        env=dict(os.environ, STORAGE=journal, THREADS="1", PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 0 and worker.returncode == 0, out + worker.stdout + worker.stderr
    trials = load(journal, "S").get_trials()
    assert [t.number for t in trials] == list(range(8))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(pids) == 2, "the standalone worker should have taken some of the trials"
    assert "w100" in worker.stdout


def test_workers_can_run_as_hydra_launcher_jobs(cli, tmp_path):
    """search.launch=launcher hands one job per worker to hydra/launcher (here Hydra's basic
    one, which runs jobs in turn; with submitit_slurm each job is a SLURM job)."""
    s = tmp_path / "S"
    result = cli(
        "-m",
        "search=random",
        "search.launch=launcher",
        "search.n_workers=2",
        "search.n_trials=3",
        "trainer.max_epochs=2",
        *FAST,
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Launching 2 jobs locally" in result.stdout
    assert [r["state"] for r in rows(s)] == ["complete"] * 3
    assert (s / "workers" / "worker_0" / "train.log").exists()
    assert (s / "trial_2" / ".hydra" / "config.yaml").exists()


@pytest.mark.slow
def test_sqlite_storage_resumes_by_study_name_from_another_sweep_dir(cli, tmp_path):
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    common = [
        "-m",
        "search=tpe",
        f"search.storage={db}",
        "search.study_name=exp1",
        "search.n_workers=2",
        "trainer.max_epochs=2",
        *FAST,
    ]
    first = cli(*common, "search.n_trials=3", f"hydra.sweep.dir={tmp_path / 'a'}")
    assert first.returncode == 0, first.stdout + first.stderr
    second = cli(*common, "search.n_trials=4", f"hydra.sweep.dir={tmp_path / 'b'}")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming study 'exp1'" in second.stdout and "3 done, 1 to run" in second.stdout
    assert (tmp_path / "b" / "trial_3" / "train.log").exists()
    assert not (tmp_path / "a" / "study.journal").exists()
    study = load(db, "exp1")
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 4


def test_postgresql_storage_shared_by_two_workers(cli, tmp_path):
    url = os.environ.get("ENGINE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("ENGINE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL for it)")
    name = f"test-{uuid.uuid4().hex[:8]}"
    result = cli(
        "-m",
        "search=tpe",
        f"search.storage={url}",
        f"search.study_name={name}",
        "search.n_trials=4",
        "search.n_workers=2",
        "search.pruner=median",
        "trainer.max_epochs=2",
        *FAST,
        f"hydra.sweep.dir={tmp_path / 'S'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    trials = load(url, name).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
