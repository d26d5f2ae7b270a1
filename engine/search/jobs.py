"""Workers that are not this command's own processes: launcher jobs, or workers started elsewhere.

``search.launch=launcher`` hands ``search.n_workers`` worker jobs to the configured Hydra
launcher (SLURM through submitit, submitit_local, joblib, ...); ``search.launch=external``
starts none and waits for workers started by other means (a Kubernetes Indexed Job,
``python -m engine.search.worker`` by hand on other machines). Either way the sweep command
watches the study, not the jobs: it prints every trial's line as in process mode, rewrites the
reports as trials finish, fails as interrupted the trial of a worker that is gone (its process
on this host, its SLURM job per squeue, or else a heartbeat too old) so that it is retried, and
submits more jobs while trials wait and too few workers are left. A command killed and run again
finds the jobs its earlier run submitted still in the queue and counts them.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from omegaconf import OmegaConf

from engine import redact
from engine.search import storage as st
from engine.search.console import first_line, quote, say, threads_each
from engine.search.slurm import SlurmQueue

# ``sweep`` below is the driver's Sweep (plan, storage, study, config) and ``progress`` its
# Progress; typed Any because the driver imports this module (no import cycle, even for types).
Sweep = Progress = Any

RECOVER_EVERY_S = 5.0  # squeue and the trials' liveness, at most this often
POLL_S = 0.5


class LauncherRounds:
    """Submits rounds of worker jobs through the Hydra launcher, one round at a time.

    The launcher's ``launch`` blocks until all its jobs end (submitit waits on SLURM), so it
    runs on a thread of its own; the command's own thread keeps watching the study meanwhile.
    """

    def __init__(self, sweep: Sweep, threads: int):
        from hydra.core.plugins import Plugins

        from engine.search.worker import launcher_job

        self.sweep, self.threads = sweep, threads
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=sweep.hydra_context,
            task_function=launcher_job,
            config=redact.scrub(sweep.config),
        )
        self.thread: threading.Thread | None = None
        self.rounds = 0
        self.next_index = 0
        self.error: BaseException | None = None

    def busy(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def overrides(self, k: int) -> list[str]:
        """Worker job k's overrides: the sweep's fixed ones and where to find the study. The
        storage URL is masked: a password reaches the job through its environment."""
        sweep = self.sweep
        return [
            *sweep.spec.fixed,
            f"search.worker={k}",
            f"search.worker_threads={self.threads}",
            f"search.storage={quote(redact.mask(sweep.storage_arg))}",
            f"search.study_name={quote(sweep.study_name)}",
            f"hydra.sweep.subdir=workers/worker_{k}",
        ]

    def submit(self, n: int) -> None:
        jobs = [self.overrides(self.next_index + i) for i in range(n)]
        first = self.next_index
        self.next_index += n
        self.rounds += 1

        def launch() -> None:
            try:
                results = self.launcher.launch(jobs, initial_job_idx=first)
                for result in results:
                    try:
                        _ = result.return_value
                    except Exception as err:  # its trials are recovered by the watcher
                        say(f"a worker job failed: {first_line(err)}")
            except BaseException as err:  # a job cancelled or lost: submitit raises for it
                self.error = err

        self.error = None
        self.thread = threading.Thread(target=launch, name="launcher", daemon=True)
        self.thread.start()

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout=timeout)


def _threads_per_job(sweep: Sweep, n: int) -> int:
    """CPU threads per job: the launcher's ``cpus_per_task`` when it sets one, else this
    machine's cores shared out (a job on another machine takes no more than it was given)."""
    cpus = OmegaConf.select(sweep.config, "hydra.launcher.cpus_per_task", default=None)
    return int(cpus) if cpus else threads_each(n)


def watch(sweep: Sweep, progress: Progress, rounds: LauncherRounds | None) -> None:
    """Until the budget is spent (or the sweep stopped on failures with nothing running):
    print trial lines and job states, recover the trials of gone workers, submit jobs while
    trials wait and fewer than ``search.n_workers`` jobs are alive. One function: the loop
    reads best as one piece."""
    spec, storage, study = sweep.spec, sweep.storage, sweep.study
    queue = SlurmQueue.for_sweep(sweep.config)
    wanted = sweep.config.search.n_workers or 1
    max_rounds = 2 * wanted + 2
    checked = 0.0
    while True:
        trials = study.get_trials(deepcopy=False)  # cached finished trials: see run_worker
        progress.update(trials)
        counted, running, waiting = st.budget(trials)
        if counted >= spec.n_trials and not running and not waiting:
            return
        failing = st.failures_in_a_row(trials, spec.session) >= spec.max_failures
        if time.monotonic() - checked >= RECOVER_EVERY_S:
            checked = time.monotonic()
            if queue is not None:
                for job, old, new in queue.refresh():
                    say(f"worker job {job}: {old + ' -> ' if old else ''}{new}")
            lost = st.recover(study, storage, job_ended=queue.ended if queue else None)
            if lost:
                say(f"trial {', '.join(map(str, lost))} lost its worker; it will be retried")
                continue
        if rounds is None:  # external workers: nothing to submit, only to watch
            if failing and not running:
                return
            time.sleep(POLL_S)
            continue
        error = rounds.take_error()
        if error is not None:
            say(f"worker jobs: {first_line(error)}")
        if not rounds.busy():
            alive = queue.alive() if queue is not None else []
            need = min(wanted, waiting) - len(alive)
            if failing or (not waiting and not running and not alive):
                return
            # squeue not answering after a round: how many jobs are alive is unknown; wait.
            unsure = queue is not None and not queue.answered and rounds.rounds > 0
            if need > 0 and not unsure:
                if rounds.rounds >= max_rounds:
                    say(f"error: {rounds.rounds} rounds of worker jobs did not finish the budget")
                    return
                more = " more" if rounds.rounds or alive else ""
                say(f"submitting {need}{more} worker job{'s' if need > 1 else ''}")
                rounds.submit(need)
                checked = 0.0  # show the new jobs' ids as soon as they exist
        time.sleep(POLL_S)


def run_launcher(sweep: Sweep, waiting: int, progress: Progress) -> None:
    """One job per worker through the configured Hydra launcher; each job runs the sweep's
    own task function (``engine.search.worker.launcher_job``), a worker loop."""
    n = max(1, min(sweep.config.search.n_workers or 1, waiting))
    threads = _threads_per_job(sweep, n)
    storage_arg = sweep.storage_arg
    if redact.has_secret(storage_arg):
        os.environ[st.STORAGE_ENV] = storage_arg  # the jobs inherit it; their overrides do not
    rounds = LauncherRounds(sweep, threads)
    target = sweep.config.hydra.launcher._target_
    say(f"worker jobs through {target}: {n} at a time, {threads} thread(s) each")
    watch(sweep, progress, rounds)
    rounds.join(timeout=30.0)  # the jobs end on their own once nothing waits


def run_external(sweep: Sweep, progress: Progress) -> None:
    """Start no worker: wait for workers started elsewhere, watching the study."""
    masked = redact.mask(sweep.storage_arg)
    storage = "" if redact.has_secret(sweep.storage_arg) else f" --storage {quote(masked)}"
    say(
        f"waiting for workers started elsewhere: python -m engine.search.worker --study "
        f"{quote(sweep.study_name)}{storage}"
        + (f"  (the URL with its password in ${st.STORAGE_ENV})" if storage == "" else "")
    )
    watch(sweep, progress, None)
