"""The study's storage, its trial slots, and recovery of trials whose worker died.

Storage. ``search.storage`` null means a journal file, ``<sweep dir>/study.journal``: an append-only
log that concurrent processes share through a lock file (Optuna's ``JournalFileBackend``). Any URL
with ``://`` is an Optuna RDB URL (``sqlite:///sweep.db`` for one machine, ``postgresql://...``
for a cluster); a plain path is a journal file.

Slots. The trial budget is exact, also with K workers: the driver *enqueues* one WAITING trial per
trial still to run (empty for a sampler, with fixed params for grid), and workers only ever claim
a WAITING trial (an atomic WAITING -> RUNNING transition in every Optuna storage), never create
one. So ``search.n_trials`` counts trials that finished (complete, pruned or failed), and a
re-run with a larger ``n_trials`` adds just the difference, numbered after the existing ones.

Recovery. A worker records ``host``, ``pid`` and the process start time on its trial and a
heartbeat every 30 s. A RUNNING trial is *stale* when its worker is gone (same host: the process
no longer exists; another host: no heartbeat for ``STALE_AFTER_S``). The driver fails stale trials
as ``interrupted`` and enqueues a retry with the same params; an interrupted trial does not count
towards ``n_trials`` (its retry does). A trial interrupted ``MAX_ATTEMPTS`` times counts as failed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from engine.config import ConfigError
from engine.search.space import grid
from engine.search.spec import SPEC_ATTR, Spec

JOURNAL = "study.journal"
HEARTBEAT_ATTR = "engine:heartbeat"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
MAX_ATTEMPTS = 3
CLAIM_SPREAD = 8  # workers spread their first claim attempt over this many waiting slots
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# How a trial's state is named everywhere a user reads it (summary.csv, the console, HPARAMS'
# trial.state, the study run's counts).
STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
FINISHED_NAMES = tuple(STATE_NAMES[s] for s in FINISHED)
INTERRUPTED = "interrupted"
SUSPENDED_ATTR = "suspended"  # a preempted trial back in the queue, to resume (see suspend)


# The storage URL as workers receive it when it carries a password: in their environment
# (readable by the same user only), never on their command line (readable by all in ``ps``).
STORAGE_ENV = "ENGINE_SEARCH_STORAGE"


def storage_arg(storage: str | None, sweep_dir: Path) -> str:
    """The storage as given to workers: the URL, or the journal file's absolute path."""
    return storage if storage else str((Path(sweep_dir) / JOURNAL).resolve())


def resolve_storage(given: str | None) -> str:
    """The usable storage URL from what a worker was given: a plain URL or path as it is; a
    masked URL (``postgresql://u:***@host/db``) or none at all from ``$ENGINE_SEARCH_STORAGE``."""
    from engine.redact import is_masked, mask

    # A Kubernetes Secret made from a file often ends in a newline, never part of a URL.
    real = (os.environ.get(STORAGE_ENV) or "").strip()
    if given is None:
        if not real:
            raise ConfigError(
                f"no storage: pass --storage URL, or put the URL in the environment variable "
                f"{STORAGE_ENV} (the way to hand over a URL with a password)."
            )
        return real
    if not is_masked(given):
        return given
    if real and mask(real) == given:
        return real
    raise ConfigError(
        f"the storage {given} has its password masked; put the full URL in the environment "
        f"variable {STORAGE_ENV} (the sweep command does this for the workers it starts)."
    )


def driver_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; use psycopg2 when only it is there."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def open_storage(arg: str) -> optuna.storages.BaseStorage:
    """The storage at ``arg``; one that cannot be opened (no server there, a wrong password, no
    such database, no driver for the URL's scheme, an unwritable journal folder) is a
    ConfigError naming ``search.storage`` with its password masked."""
    from engine.redact import mask

    try:
        if "://" in arg:
            url = driver_url(arg)
            kwargs: dict[str, Any] = {}
            if url.startswith("sqlite"):
                # Several processes write one SQLite file: wait for its lock instead of failing.
                kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
            return optuna.storages.RDBStorage(url, **kwargs)
        path = Path(arg)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A process killed while appending leaves the lock behind; break it after 10 s (appends
        # take milliseconds) rather than Optuna's default 30.
        lock = optuna.storages.journal.JournalFileSymlinkLock(str(path), grace_period=10)
        return optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(path), lock_obj=lock)
        )
    except Exception as err:  # SQLAlchemy's and the DB drivers' many types, OSError, ImportError
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        cause = mask(lines[0] if lines else type(err).__name__)
        raise ConfigError(
            f"search.storage={mask(arg)} could not be opened: {cause}. Check the URL (scheme, "
            f"host, port, user, password, database name) and that the server is running and "
            f"reachable from here; or leave search.storage unset for a journal file in the "
            f"sweep dir."
        ) from err


def save_spec(storage: optuna.storages.BaseStorage, study_id: int, spec: Spec) -> None:
    storage.set_study_user_attr(study_id, SPEC_ATTR, spec.to_json())


def load_spec(storage: optuna.storages.BaseStorage, study_id: int) -> Spec:
    text = storage.get_study_user_attrs(study_id).get(SPEC_ATTR)
    if text is None:
        raise ValueError(
            "this study was not created by an engine sweep (no engine.spec); start it with "
            "`python -m engine.train -m search=<preset> ...` first."
        )
    return Spec.from_json(text)


# --------------------------------------------------------------------------------------------
# counting


def attempt(t: FrozenTrial) -> int:
    return int(t.user_attrs.get("attempt", 1))


def is_retried_interruption(t: FrozenTrial) -> bool:
    """An interrupted trial that gets (or got) a retry: not part of the budget."""
    return (
        t.state == TrialState.FAIL
        and bool(t.user_attrs.get("interrupted"))
        and attempt(t) < MAX_ATTEMPTS
    )


def is_counted(t: FrozenTrial) -> bool:
    """Counts towards ``search.n_trials``: finished, and not an interruption that is retried."""
    return t.state in FINISHED and not is_retried_interruption(t)


def state_name(t: FrozenTrial) -> str:
    """The trial's state as the reports name it; a failed trial whose worker died and that is
    retried reads ``interrupted``."""
    return INTERRUPTED if is_retried_interruption(t) else STATE_NAMES[t.state]


def budget(trials: Sequence[FrozenTrial]) -> tuple[int, int, int]:
    """(counted finished, running, waiting)."""
    counted = sum(is_counted(t) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return counted, running, waiting


def failures_in_a_row(trials: Sequence[FrozenTrial], since: str) -> int:
    """Counted trials that failed in a row, latest first, among those finished after ``since``."""
    start = dt.datetime.fromisoformat(since) if since else dt.datetime.min
    done = [
        t
        for t in trials
        if is_counted(t) and t.datetime_complete is not None and t.datetime_complete >= start
    ]
    done.sort(key=lambda t: t.datetime_complete)
    n = 0
    for t in reversed(done):
        if t.state != TrialState.FAIL:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------
# slots


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, default=str)


def top_up(study: optuna.Study, spec: Spec) -> int:
    """Enqueue WAITING slots so that counted + running + waiting == n_trials; return how many.

    For grid each slot carries one combination not yet covered, in grid order.
    """
    trials = study.get_trials(deepcopy=False)
    counted, running, waiting = budget(trials)
    need = spec.n_trials - counted - running - waiting
    if need <= 0:
        return 0
    if spec.sampler == "grid":
        covered = {
            _params_key(t.system_attrs.get("fixed_params", t.params))
            for t in trials
            if is_counted(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)
        }
        added = 0
        for combo in grid(spec.params()):
            if added == need:
                break
            if _params_key(combo) not in covered:
                study.enqueue_trial(combo)
                added += 1
        return added
    for _ in range(need):
        study.enqueue_trial({})
    return need


def claim(
    storage: optuna.storages.BaseStorage, study_id: int, worker: int = 0
) -> FrozenTrial | None:
    """Take a WAITING trial (atomically: WAITING -> RUNNING) and name this worker on it; None
    when none is left.

    Retries and preempted trials go first, lowest number first. The other waiting trials are
    empty slots, all alike: worker k starts at the k-th of the first few (``CLAIM_SPREAD``), so
    that many workers on a database do not all race for the same row (16 workers on PostgreSQL
    took 5 to 7 tries per claim when all began at the lowest), while one worker alone still runs
    them in number order. The worker's name goes on only after
    the switch has succeeded: a rival that lost the race never writes it, so recovery checks the
    process that really runs the trial (a worker killed between the two writes is found by the
    trial's age, as one whose heartbeat stopped).
    """
    waiting = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    first = sorted(
        (t for t in waiting if SUSPENDED_ATTR in t.user_attrs or "retry_of" in t.user_attrs),
        key=lambda t: t.number,
    )
    taken = {t.number for t in first}
    slots = sorted((t for t in waiting if t.number not in taken), key=lambda t: t.number)
    if slots:
        start = worker % min(len(slots), CLAIM_SPREAD)
        slots = slots[start:] + slots[:start]
    for t in first + slots:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                storage.set_trial_user_attr(trial_id, "worker", worker_info())
                return storage.get_trial(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


# --------------------------------------------------------------------------------------------
# workers and recovery


HOST = socket.gethostname()


def cpu_count() -> int:
    """The CPUs this process may run on (a SLURM job's allocation, a taskset), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19]  # field 22 of stat; fields[0] is field 3 (state)


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def worker_info() -> dict[str, Any]:
    """Who runs a trial: host, pid and the pid's start time; under SLURM also the job
    (``jobid`` as squeue and sacct name it, ``123_4`` for an array task), so the sweep command
    can tell a worker on another node is gone as soon as SLURM says its job ended."""
    pid = os.getpid()
    info: dict[str, Any] = {"host": HOST, "pid": pid, "start": _proc_start(pid)}
    job = slurm_job_id()
    if job:
        info["slurm_job"] = job
    return info


def slurm_job_id(environ: Any = None) -> str | None:
    env = os.environ if environ is None else environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SLURM_JOB_ID") or None


def process_alive(info: dict[str, Any]) -> bool:
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _proc_state(pid) in ("Z", "X"):  # killed, not yet reaped
        return False
    start = info.get("start")
    return start is None or _proc_start(pid) in (None, start)


def is_stale(
    t: FrozenTrial, now: float | None = None, job_ended: Callable[[str], bool] | None = None
) -> bool:
    """Whether a RUNNING trial's worker is gone: its process (on this host), its SLURM job
    (``job_ended``, asked of the queue), or else no heartbeat for ``STALE_AFTER_S``."""
    now = time.time() if now is None else now
    info = t.user_attrs.get("worker")
    if info and info.get("host") == HOST:
        return not process_alive(info)
    if info and info.get("slurm_job") and job_ended is not None and job_ended(info["slurm_job"]):
        return True
    last = t.system_attrs.get(HEARTBEAT_ATTR)
    if last is None:
        last = t.datetime_start.timestamp() if t.datetime_start else 0.0
    return now - float(last) > STALE_AFTER_S


def fail_interrupted(
    study: optuna.Study, t: FrozenTrial, reason: str, storage: optuna.storages.BaseStorage
) -> None:
    """Record a RUNNING trial as FAIL, interrupted (retried by :func:`recover`)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
    try:
        storage.set_trial_user_attr(trial_id, "interrupted", True)
        storage.set_trial_user_attr(trial_id, "fail_reason", reason)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass  # it finished meanwhile


def recover(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    job_ended: Callable[[str], bool] | None = None,
) -> list[int]:
    """Fail stale RUNNING trials as interrupted and enqueue their retries; return their numbers."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if is_stale(t, job_ended=job_ended):
            fail_interrupted(study, t, "interrupted: its worker process stopped", storage)
            failed.append(t.number)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if is_retried_interruption(t) and t.number not in retried:
            params = t.system_attrs.get("fixed_params", {}) or t.params
            study.enqueue_trial(
                params, user_attrs={"retry_of": t.number, "attempt": attempt(t) + 1}
            )
    return failed


def suspend(
    storage: optuna.storages.BaseStorage, study_id: int, number: int, info: dict[str, Any]
) -> None:
    """Hand a RUNNING trial back to the queue (RUNNING -> WAITING) with what resumes it.

    A preempted trial is not a failure to retry from scratch: its params stay on it, its
    checkpoint is in its run dir, and the next claim (lowest number first, so it goes before
    new trials) resumes it there, under the same trial number. ``info``: checkpoint, step,
    reason, and how many times it was suspended."""
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    storage.set_trial_user_attr(trial_id, SUSPENDED_ATTR, info)
    storage.set_trial_state_values(trial_id, state=TrialState.WAITING)


class Heartbeat:
    """Writes the time into the trial every ``HEARTBEAT_S`` seconds, from a daemon thread."""

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        # The trial's start time is its first sign of life; beats follow while it runs.
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_ATTR, time.time())
            except Exception:  # a finished trial, or the storage briefly away: try again later
                pass

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
