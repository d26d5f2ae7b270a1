"""Fault injection for the reliability tests: real failures at chosen points of a real run.

Each fault is armed by an environment variable and costs one integer comparison otherwise:

- ``ENGINE_FAULT_KILL_AT_STEP=N``: the process SIGKILLs itself just before optimizer step N
  (1-based), as a kill from outside would find it.
- ``ENGINE_FAULT_KILL_DURING_SAVE=N``: the N-th checkpoint write of the process SIGKILLs itself
  halfway through writing its temporary file, before the rename.
- ``ENGINE_FAULT_NAN_AT_STEP=N``: the loss of the batch that completes optimizer step N becomes
  NaN, so its gradients do too.
"""

from __future__ import annotations

import os
import signal


def _armed(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


KILL_AT_STEP = _armed("ENGINE_FAULT_KILL_AT_STEP")
KILL_DURING_SAVE = _armed("ENGINE_FAULT_KILL_DURING_SAVE")
NAN_AT_STEP = _armed("ENGINE_FAULT_NAN_AT_STEP")
_saves = 0


def kill_now() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def before_step(step: int) -> None:
    """Called with the number of the optimizer step about to be taken."""
    if step == KILL_AT_STEP:
        kill_now()


def nan_now(step: int) -> bool:
    """True once: for the batch that completes optimizer step ``NAN_AT_STEP``."""
    global NAN_AT_STEP
    if step == NAN_AT_STEP:
        NAN_AT_STEP = 0  # a skipped step is retried with the next batch, which stays clean
        return True
    return False


def during_save() -> None:
    """Called by the checkpoint writer with half of the temporary file written."""
    global _saves
    _saves += 1
    if _saves == KILL_DURING_SAVE:
        kill_now()
