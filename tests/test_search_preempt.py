"""Preemption: a worker warned by a signal (SLURM's SIGUSR2 before a time limit, SIGTERM on
preemption) checkpoints its trial at the next step and hands it back to the queue; the retry
resumes that trial, under the same number in the same run dir, and ends bit-identical to a run
that was never stopped. The SLURM path is in test_search_slurm.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import torch
from conftest import REPO, run_cli
from optuna.trial import TrialState

from engine import checkpoint as ckpt
from engine import preempt
from engine.search.storage import SUSPENDED_ATTR, open_storage

SWEEP = [
    "-m",
    "search=random",
    "search.n_trials=1",
    "search.n_workers=1",
    "data=digits",
    "model=mlp",
    "trainer.max_epochs=2",
    "data.batch_size=128",
    "trainer.progress=none",
    "trainer.num_threads=1",
]


def study_of(sweep_dir: Path) -> optuna.Study:
    storage = open_storage(str(sweep_dir / "study.journal"))
    return optuna.load_study(study_name=sweep_dir.name, storage=storage)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(run_dir / "checkpoints" / "last.pt")["model"]


@pytest.mark.slow
def test_a_signalled_trial_resumes_from_its_checkpoint_and_ends_bit_identical(tmp_path):
    stopped, plain = tmp_path / "stopped", tmp_path / "plain"
    # SIGUSR2 arrives before optimizer step 5 of the trial's first epoch (9 steps an epoch).
    first = run_cli(*SWEEP, f"hydra.sweep.dir={stopped}", env={"ENGINE_FAULT_SIGNAL_AT_STEP": "5"})
    assert first.returncode == 0, first.stdout + first.stderr
    assert "trial 0 suspended at step 5 (SIGUSR2): it resumes from its checkpoint" in first.stdout
    second = run_cli(*SWEEP, f"hydra.sweep.dir={plain}")
    assert second.returncode == 0, second.stdout + second.stderr

    trials = study_of(stopped).get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE)]  # no retry trial
    assert trials[0].user_attrs[SUSPENDED_ATTR]["step"] == 5
    reference = study_of(plain).get_trials()[0]
    assert trials[0].params == reference.params
    assert trials[0].values == reference.values
    assert trials[0].intermediate_values == reference.intermediate_values

    log = (stopped / "trial_0" / "train.log").read_text()
    assert "SIGUSR2: stopping at step 5 with a checkpoint" in log
    assert "resumed from" in log and "at epoch 1, batch 5, step 5" in log
    ours, theirs = weights(stopped / "trial_0"), weights(plain / "trial_0")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_worker_sent_sigterm_hands_its_trial_back_with_a_checkpoint(tmp_path):
    """A standalone worker sent SIGTERM mid-trial (a preemption) exits with code 75; its trial
    is WAITING again, with the checkpoint and step that resume it, and no retry trial is added.
    The sweep command runs with search.launch=external: it creates the study, starts no worker
    and waits for this one."""
    sweep = tmp_path / "S"
    long_trial = [*SWEEP, "trainer.max_epochs=300", "search.launch=external"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    driver = subprocess.Popen(
        [sys.executable, "-m", "engine.train", *long_trial, f"hydra.sweep.dir={sweep}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shown: list[str] = []
    reader = threading.Thread(target=lambda: shown.extend(driver.stdout), daemon=True)
    reader.start()
    worker = None
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "engine.search.worker", "--study", "S", "--wait-for-study", "60"]
            + ["--storage", str(sweep / "study.journal"), "--threads", "1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = sweep / "trial_0" / "train.log"
        last = sweep / "trial_0" / "checkpoints" / "last.pt"
        wait_for(last.exists, 120, "trial 0's first checkpoint")
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
        assert worker.returncode == 75, output
        trials = study_of(sweep).get_trials()
        assert [(t.number, t.state) for t in trials] == [(0, TrialState.WAITING)]
        info = trials[0].user_attrs[SUSPENDED_ATTR]
        assert info["reason"] == "SIGTERM" and info["count"] == 1
        assert ckpt.load(Path(info["checkpoint"]))["fit"]["global_step"] == info["step"]
        assert "SIGTERM: stopping at step" in log.read_text()
        # The sweep command, watching the study, says so too.
        wait_for(lambda: any("trial 0 suspended at step" in line for line in shown), 30, "it")
    finally:
        for proc in (worker, driver):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    reader.join(timeout=10)
    assert any(
        "waiting for workers started elsewhere: python -m engine.search.worker" in line
        for line in shown
    )


def wait_for(condition, timeout: float, what: str) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_a_second_signal_interrupts_at_once():
    preempt.clear()
    assert preempt.install((signal.SIGUSR1,))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested() == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        preempt.clear()
