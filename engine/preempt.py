"""Stop requests from outside: a cluster about to preempt a job, or end it at its time limit.

SLURM warns a job before it ends it: ``--signal=USR2@<s>`` sends SIGUSR2 ``s`` seconds before
the time limit (up to 60 s earlier), and a preemption sends SIGTERM, then SIGKILL ``KillWait``
seconds later. :func:`install` turns those signals into a request that the trainer reads after
every optimizer step: it then writes a checkpoint of that exact step and stops (``Preempted``),
so the run, or a sweep's trial, resumes from there instead of from its last epoch or from
nothing. A second signal while the first is pending interrupts at once (``KeyboardInterrupt``):
a user pressing Ctrl-C twice, or a process that will not wait, is not held up by a long step.

The handler only records the request: a signal handler runs between two bytecodes of the main
thread, anywhere in a step, where writing a checkpoint would save half an update.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

_request: str | None = None
_previous: dict[int, Any] = {}


def requested() -> str | None:
    """Why a stop was asked for (``"SIGUSR2"``), or None: one read per optimizer step."""
    return _request


def request(reason: str) -> None:
    """Ask the running loop to checkpoint and stop at its next step boundary."""
    global _request
    _request = reason


def clear() -> None:
    global _request
    _request = None


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if _request is not None:
        raise KeyboardInterrupt(f"{name} while stopping for {_request}")
    request(name)


def install(signals: Iterable[int] = (signal.SIGUSR2, signal.SIGTERM)) -> bool:
    """Route ``signals`` to a stop request; the handlers they had are kept for :func:`previous`.
    False, and nothing changed, off the main thread (Python sets handlers only there: a worker
    that Hydra's basic launcher runs on the sweep command's launcher thread)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        _previous[signum] = signal.signal(signum, _on_signal)
    return True


def previous(signum: int) -> Callable[[int, Any], None] | None:
    """The handler ``signum`` had before :func:`install`, when it was a Python function (a job
    runner's own, such as submitit's checkpoint-and-requeue on SIGUSR2)."""
    handler = _previous.get(signum)
    return handler if callable(handler) else None


def signal_number(reason: str) -> int | None:
    try:
        return int(signal.Signals[reason])
    except KeyError:
        return None
