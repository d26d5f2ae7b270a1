"""What SLURM says about a sweep's worker jobs: their ids and states, asked of ``squeue``.

Hydra's submitit launcher gives every job a folder named by its SLURM id under
``hydra.launcher.submitit_folder`` (``<sweep dir>/.submitit/%j``; ``123_4`` for task 4 of array
job 123), so the sweep command finds the jobs of its sweep, including those an earlier run of
the command submitted before it was killed, without keeping a list of its own. ``squeue`` lists
a job while it is pending, running, requeued or completing; a job it no longer lists has ended
(its trial, if it left one RUNNING, is interrupted). One ``squeue`` call per refresh covers
every job: the driver refreshes every few seconds, not per trial.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

_JOB_ID = re.compile(r"^\d+(_\d+)?$")
# squeue's states of a job that may still run a trial (everything else is on its way out).
ACTIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}


def jobs_folder(config: DictConfig) -> Path | None:
    """Where the launcher puts one folder per SLURM job, or None for a launcher that is not
    submitit's SLURM one (submitit_local, joblib: their jobs are local processes)."""
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
    pattern = OmegaConf.select(config, "hydra.launcher.submitit_folder", default=None)
    if "SlurmLauncher" not in target or not pattern or "%j" not in str(pattern):
        return None
    return Path(str(pattern).split("%j", 1)[0]).resolve()


class SlurmQueue:
    """The sweep's worker jobs as SLURM sees them; ``changes()`` names each new state once."""

    def __init__(self, folder: Path, squeue: str = "squeue"):
        self.folder, self.squeue = folder, squeue
        self.states: dict[str, str] = {}  # job id -> state ("ENDED" once squeue drops it)
        self.answered = False  # whether squeue answered at the last refresh

    @classmethod
    def for_sweep(cls, config: DictConfig) -> SlurmQueue | None:
        folder = jobs_folder(config)
        if folder is None or shutil.which("squeue") is None:
            return None
        return cls(folder)

    def known(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = {p.name for p in self.folder.iterdir() if _JOB_ID.match(p.name)}
        # An array job's own id has a folder beside its tasks' (123 beside 123_0, 123_1): the
        # tasks are the workers.
        arrays = {name.split("_", 1)[0] for name in names if "_" in name}
        return sorted(names - arrays)

    def refresh(self) -> list[tuple[str, str, str]]:
        """Ask squeue for every known job; return the (job, old state, new state) changes."""
        jobs = self.known()
        listed = _squeue_states(self.squeue, jobs) if jobs else {}
        self.answered = listed is not None
        if listed is None:  # squeue failed (the controller briefly away): keep what we had
            return []
        changes = []
        for job in jobs:
            new = listed.get(job, "ENDED")
            old = self.states.get(job, "")
            if new != old:
                changes.append((job, old, new))
                self.states[job] = new
        return changes

    def alive(self) -> list[str]:
        return [job for job, state in self.states.items() if state in ACTIVE]

    def ended(self, job: str) -> bool:
        """True only when squeue answered and no longer lists ``job`` as active (a job of
        another sweep, or one squeue never listed here, is looked up on its own)."""
        if job not in self.states:
            listed = _squeue_states(self.squeue, [job])
            if listed is None:
                return False
            self.states[job] = listed.get(job, "ENDED")
        return self.answered and self.states[job] not in ACTIVE


def _squeue_states(squeue: str, jobs: list[str]) -> dict[str, str] | None:
    """{job id: state} for the listed jobs still in the queue; None when squeue failed."""
    cmd = [
        squeue,
        "--noheader",
        "--array",
        "--states=all",
        "--format=%i %T",
        f"--jobs={','.join(jobs)}",
    ]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        # squeue refuses an id it has forgotten entirely ("Invalid job id specified") when it
        # is the only one asked for: that job has ended.
        return {} if "Invalid job id" in out.stderr else None
    states: dict[str, Any] = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1]
    return states
