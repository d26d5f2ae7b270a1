"""Sweeps on a real one-node SLURM cluster (scripts/slurm_local.sh; CI starts it), through
Hydra's submitit launcher and our ``hydra/launcher=slurm_cpu`` preset: worker jobs, a cancelled
job, the sweep command killed and run again, a job warned with SIGUSR2 before its time limit."""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO
from optuna.trial import TrialState
from slurm import run as slurm_run
from slurm import scancel, squeue_jobs, wait_for

from engine import checkpoint as ckpt
from engine.search.storage import SUSPENDED_ATTR, open_storage

pytestmark = pytest.mark.slow

TRIAL = [
    "data=digits",
    "model=mlp",
    "data.batch_size=128",
    "trainer.progress=none",
    "trainer.num_threads=1",
]
ON_SLURM = [
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=15",
]


def sweep_command(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "engine.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]


class Command:
    """A sweep command running in the background; ``text`` is its output so far."""

    def __init__(self, cmd: list[str], extra_env: dict[str, str] | None = None):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def finish(self, timeout: float = 300) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"not finished within {timeout} s:\n{self.text}") from None
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, self.text
        return self.text


def trials(sweep_dir: Path, storage: str | None = None, study: str | None = None):
    """The study's trials ([] until it exists): the sweep dir's journal unless told otherwise."""
    storage = storage or str(sweep_dir / "study.journal")
    if "://" not in storage and not Path(storage).exists():
        return []
    try:
        found = optuna.load_study(study_name=study or sweep_dir.name, storage=open_storage(storage))
    except KeyError:
        return []
    return found.get_trials()


def running_on_slurm(found: list[optuna.trial.FrozenTrial]) -> optuna.trial.FrozenTrial | None:
    for t in found:
        if t.state == TrialState.RUNNING and "slurm_job" in t.user_attrs.get("worker", {}):
            return t
    return None


def cancel_jobs_of(sweep_dir: Path) -> None:
    """The test's own jobs (the launcher names a folder after each), not another test's."""
    folder = sweep_dir / ".submitit"
    ours = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    for job, _, _ in squeue_jobs():
        if job in ours:
            scancel(job)


def test_a_tpe_sweep_of_two_worker_jobs_survives_a_killed_command_and_a_cancelled_job(
    slurm_cluster, tmp_path
):
    """scripts/slurm_sweep.sh, as the README runs it: a shared PostgreSQL study where CI has one
    (its password role: the URL reaches the jobs through the environment only), else a journal."""
    sweep = tmp_path / "S"
    storage = os.environ.get("ENGINE_TEST_POSTGRES_SECRET_URL") or str(tmp_path / "study.journal")
    study = f"slurm-{uuid.uuid4().hex[:8]}"
    cmd = [
        "bash", str(REPO / "scripts" / "slurm_sweep.sh"), str(sweep),
        "search.n_trials=6", "search.n_workers=2", "trainer.max_epochs=60", *TRIAL, *ON_SLURM[1:],
    ]  # fmt: skip
    env = {"ENGINE_SEARCH_STORAGE": storage, "STUDY": study, "PYTHON": sys.executable}
    found = functools.partial(trials, sweep, storage, study)
    try:
        first = Command(cmd, env)
        # Killed as soon as its jobs run trials: they have most of the budget still to run.
        wait_for(lambda: running_on_slurm(found()), 180, what="a trial running in a job")
        first.kill()  # the sweep command dies; its two worker jobs go on in SLURM
        ours = {p.name for p in (sweep / ".submitit").iterdir()}
        queued = {job for job, state, _ in squeue_jobs() if state in ("RUNNING", "PENDING")}
        jobs_before = queued & ours
        assert len(jobs_before) == 2, (queued, ours)

        again = Command(cmd, env)  # the same command: re-attaches to the study and to the jobs
        try:
            wait_for(lambda: "worker job" in again.text, 180, what="the command to find the jobs")
        except AssertionError as err:
            raise AssertionError(f"{err}; its output:\n{again.text}") from None
        victim = wait_for(lambda: running_on_slurm(found()), 120, what="a trial running in a job")
        job = victim.user_attrs["worker"]["slurm_job"]
        scancel(job)
        out = again.finish()
    finally:
        cancel_jobs_of(sweep)

    for old in sorted(jobs_before):
        assert f"worker job {old}: RUNNING" in out, out  # found in the queue, not submitted anew
    with (sweep / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows].count("complete") == 6, rows
    # The cancelled job's trial went on elsewhere with the same params: resumed from the
    # checkpoint it wrote on SIGTERM, or (had it been killed outright) failed as interrupted and
    # retried; either way it is counted once.
    same = [t for t in found() if t.params == victim.params]
    assert sum(t.state == TrialState.COMPLETE for t in same) == 1
    if "://" in storage:
        password = storage.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
        for path in sweep.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), path
        assert password not in out


def test_a_job_warned_with_usr2_requeues_and_resumes_its_trial_bit_identical(
    slurm_cluster, tmp_path
):
    warned, plain = tmp_path / "warned", tmp_path / "plain"
    trial = ["search=random", "search.n_trials=1", "search.n_workers=1", "trainer.max_epochs=40"]
    try:
        proc = Command(sweep_command(warned, *trial, *TRIAL, *ON_SLURM))
        last = warned / "trial_0" / "checkpoints" / "last.pt"
        victim = wait_for(
            lambda: last.exists() and running_on_slurm(trials(warned)), 180,
            what="trial 0 running in its job, with a first checkpoint",
        )  # fmt: skip
        job = victim.user_attrs["worker"]["slurm_job"]
        scancel(job, signal="USR2")  # what --signal=USR2@<s> sends ahead of the time limit
        out = proc.finish()
        # The job ends on its own once its worker finds no trial left.
        wait_for(lambda: job not in [j for j, _, _ in squeue_jobs()], 120, what=f"{job} to end")
    finally:
        cancel_jobs_of(warned)
    Command(sweep_command(plain, *trial, *TRIAL)).finish()

    assert "trial 0 suspended at step" in out and "(SIGUSR2)" in out
    (t,) = trials(warned)
    assert t.state == TrialState.COMPLETE and t.number == 0
    assert t.user_attrs[SUSPENDED_ATTR]["reason"] == "SIGUSR2"
    # The same SLURM job ran it to the end after requeueing itself (submitit's requeue).
    assert t.user_attrs["worker"]["slurm_job"] == job
    runs = slurm_run("sacct", "-n", "-X", "-P", "--duplicates", "-j", job, "-o", "State").stdout
    assert runs.split()[:1] == ["REQUEUED"] and runs.split()[-1] == "COMPLETED", runs
    log = (warned / "trial_0" / "train.log").read_text()
    assert "SIGUSR2: stopping at step" in log and "resumed from" in log
    (u,) = trials(plain)
    assert t.params == u.params and t.values == u.values
    ours = ckpt.load(warned / "trial_0" / "checkpoints" / "last.pt")["model"]
    theirs = ckpt.load(plain / "trial_0" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_trial_on_another_host_is_lost_once_squeue_drops_its_job(slurm_cluster, tmp_path):
    """A worker on another node cannot be checked by its pid: the trial counts as lost as soon as
    SLURM no longer lists the worker's job (not after the 5-minute heartbeat)."""
    from slurm import sbatch

    from engine.search.slurm import SlurmQueue
    from engine.search.storage import is_stale

    job = sbatch("--wrap", "sleep 300", "-o", str(tmp_path / "out"))
    (tmp_path / ".submitit" / job).mkdir(parents=True)
    queue = SlurmQueue(tmp_path / ".submitit")
    wait_for(lambda: ("RUNNING" in {s for _, _, s in queue.refresh()}) or queue.alive(), 30)
    trial = optuna.trial.create_trial(state=TrialState.RUNNING, values=None)
    trial.set_user_attr("worker", {"host": "another-node", "pid": 1, "slurm_job": job})
    assert queue.alive() == [job] and not is_stale(trial, job_ended=queue.ended)
    scancel(job)
    wait_for(lambda: ("ENDED" in {new for _, _, new in queue.refresh()}) or not queue.alive(), 30)
    assert is_stale(trial, job_ended=queue.ended)
    assert not is_stale(trial)  # without SLURM's word, only the stale heartbeat would tell
