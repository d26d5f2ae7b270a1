"""Fault injection for the reliability tests: real failures at chosen points of a real run.

Each fault is armed by an environment variable, read once when a run is built
(:meth:`Faults.from_env`). A run with none of them set gets ``None``: the trainer and the
checkpoint writer then carry no test state at all, and their hot paths test one ``is None``.

- ``ENGINE_FAULT_KILL_AT_STEP=N``: the process SIGKILLs itself just before optimizer step N
  (1-based), as a kill from outside would find it.
- ``ENGINE_FAULT_KILL_DURING_SAVE=N``: the N-th checkpoint write of the run SIGKILLs the process
  halfway through writing its temporary file, before the rename.
- ``ENGINE_FAULT_NAN_AT_STEP=N``: the loss of the batch that completes optimizer step N becomes
  NaN, so its gradients do too.
- ``ENGINE_FAULT_SIGNAL_AT_STEP=N``: the process sends itself SIGUSR2 just before optimizer step
  N, as SLURM does ahead of a time limit (``--signal=USR2@<s>``), so the preemption path runs at
  a known step.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

_VARIABLES = {
    "kill_at_step": "ENGINE_FAULT_KILL_AT_STEP",
    "kill_during_save": "ENGINE_FAULT_KILL_DURING_SAVE",
    "nan_at_step": "ENGINE_FAULT_NAN_AT_STEP",
    "signal_at_step": "ENGINE_FAULT_SIGNAL_AT_STEP",
}


def _armed(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "0"))
    except ValueError:
        return 0


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Faults:
    """The faults armed for one run; 0 means not armed."""

    kill_at_step: int = 0
    kill_during_save: int = 0
    nan_at_step: int = 0
    signal_at_step: int = 0
    saves: int = 0  # checkpoint writes so far

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults | None:
        armed = {field: _armed(environ, name) for field, name in _VARIABLES.items()}
        return cls(**armed) if any(armed.values()) else None

    def before_step(self, step: int) -> None:
        """Called with the number of the optimizer step about to be taken."""
        if step == self.kill_at_step:
            kill_now()
        if step == self.signal_at_step:
            os.kill(os.getpid(), signal.SIGUSR2)

    def nan_now(self, step: int) -> bool:
        """True once: for the batch that completes optimizer step ``nan_at_step``."""
        if step == self.nan_at_step:
            self.nan_at_step = 0  # a skipped step is retried with the next batch, which stays clean
            return True
        return False

    def during_save(self) -> None:
        """Called by the checkpoint writer with half of the temporary file written."""
        self.saves += 1
        if self.saves == self.kill_during_save:
            kill_now()
