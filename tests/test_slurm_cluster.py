"""Smoke tests of the real one-node SLURM cluster (scripts/slurm_local.sh) that the SLURM launcher
tests build on: jobs run, accounting sees how they ended, signals reach the job's processes, a
requeued job runs again, and submitit (real sbatch, sacct, scancel) gets results and sees
cancellations. Skipped, with the reason, where no cluster runs."""

import os
import time
from pathlib import Path

import pytest
import submitit
from slurm import run, sacct_fields, sacct_state, sbatch, scancel, squeue_jobs, wait_for

# A job that stays up until cancelled; long enough for any test, short enough to end by itself.
SLEEP = "sleep 300"


@pytest.fixture
def jobs(slurm_cluster):
    """Job ids a test submitted; whatever still runs at the end is cancelled."""
    ids: list[str] = []
    yield ids
    for job in ids:
        run("scancel", job, check=False)


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


def test_a_batch_job_completes_and_sacct_says_so(jobs, tmp_path):
    out = tmp_path / "out.txt"
    job = sbatch("-J", "engine-test-ok", "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID")
    jobs.append(job)
    wait_for(lambda: sacct_state(job) == "COMPLETED", 30, what=f"job {job} to be COMPLETED")
    assert sacct_fields(job, "ExitCode")["ExitCode"] == "0:0"
    assert out.read_text().strip() == f"hello from {job}"


def test_a_cancelled_running_job_is_cancelled_in_sacct(jobs, tmp_path):
    job = sbatch("-J", "engine-test-cancel", "-o", str(tmp_path / "out.txt"), "--wrap", SLEEP)
    jobs.append(job)
    wait_for(lambda: (job, "RUNNING", "engine-test-cancel") in squeue_jobs(), 30, what="RUNNING")
    scancel(job)
    wait_for(lambda: sacct_state(job) == "CANCELLED", 20, what=f"job {job} to be CANCELLED")
    assert all(state != "RUNNING" for job_id, state, _ in squeue_jobs() if job_id == job)


def test_scancel_signal_reaches_the_step_and_with_batch_the_shell(jobs, tmp_path):
    # The batch shell and the step (srun's python) each note the USR2 they get in the log.
    log = tmp_path / "log"
    step = (
        "import signal, time\n"
        f"log = open({str(log)!r}, 'a', buffering=1)\n"
        "signal.signal(signal.SIGUSR2, lambda *_: log.write('step got USR2\\n'))\n"
        "log.write('step ready\\n')\n"
        "while True: time.sleep(0.1)\n"
    )
    (tmp_path / "step.py").write_text(step)
    script = write_script(
        tmp_path / "job.sh",
        f"trap 'echo batch got USR2 >> {log}' USR2\n"
        f"srun python3 {tmp_path / 'step.py'} &\n"
        # A trapped signal ends `wait` early; the second one waits for the step again.
        "wait; wait\n",
    )
    job = sbatch("-J", "engine-test-signal", "-o", str(tmp_path / "out.txt"), str(script))
    jobs.append(job)
    wait_for(lambda: log.exists() and "step ready" in log.read_text(), 30, what="the step to start")

    scancel(job, "USR2")
    wait_for(lambda: "step got USR2" in log.read_text(), 10, what="the step to get USR2")
    time.sleep(0.5)  # time enough for a wrongly signalled shell to write its line
    assert "batch got USR2" not in log.read_text()

    scancel(job, "USR2", batch=True)
    wait_for(lambda: "batch got USR2" in log.read_text(), 10, what="the batch shell to get USR2")
    # A handled signal ends nothing (squeue: sacct learns of a start a moment later).
    assert (job, "RUNNING", "engine-test-signal") in squeue_jobs()


@pytest.mark.slow
def test_a_requeued_job_runs_again_with_its_restart_count(jobs, tmp_path):
    # A requeued job waits out the credential lifetime (cred_expire=10 s in slurm_local.sh).
    log = tmp_path / "log"
    script = write_script(
        tmp_path / "job.sh", f"echo run ${{SLURM_RESTART_COUNT:-0}} >> {log}\nexec {SLEEP}\n"
    )
    job = sbatch("-J", "engine-test-requeue", "-o", str(tmp_path / "out.txt"), str(script))
    jobs.append(job)
    wait_for(lambda: log.exists() and "run 0" in log.read_text(), 30, what="the first run")
    run("scontrol", "requeue", job)
    wait_for(lambda: "run 1" in log.read_text(), 60, what="the requeued job to run again")
    assert log.read_text().split("\n")[:2] == ["run 0", "run 1"]
    assert (job, "RUNNING", "engine-test-requeue") in squeue_jobs()


def test_submitit_gets_a_result_through_sbatch(slurm_cluster, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(name="engine-test-submitit", timeout_min=5)
    # os.getenv runs inside the job, so it sees the job's own environment.
    job = executor.submit(os.getenv, "SLURM_JOB_ID")
    try:
        wait_for(lambda: job.done(force_check=True), 60, what=f"submitit job {job.job_id}")
        assert job.result() == job.job_id
        wait_for(lambda: sacct_state(job.job_id) == "COMPLETED", 20, what="sacct: COMPLETED")
    finally:
        job.cancel(check=False)


def test_submitit_sees_a_cancelled_job_as_done_at_once(slurm_cluster, tmp_path):
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(name="engine-test-submitit-cancel", timeout_min=5)
    job = executor.submit(time.sleep, 300)
    try:
        wait_for(lambda: sacct_state(job.job_id) == "RUNNING", 30, what="the job to run")
        assert not job.done(force_check=True)
        job.cancel()
        # job.state is cached and polled ever more slowly; force_check asks sacct now.
        wait_for(lambda: job.done(force_check=True), 10, what="submitit to see the cancel")
        assert job.watcher.get_state(job.job_id, mode="cache").startswith("CANCELLED")
    finally:
        run("scancel", job.job_id, check=False)
