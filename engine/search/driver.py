"""The sweep driver: what ``python -m engine.train -m search=<preset>`` runs.

1. Plan, before any compute: parse the space (preset ``search.params`` + command-line sweeps),
   compose and validate trial configs at the space's corners (a misspelt key, a missing config
   group option, an out-of-range bound fails here, naming the key), resolve the objective.
2. Open or create the study (journal file in the sweep dir by default), store the worker spec in
   it, recover trials left RUNNING by dead workers (failed as interrupted, retried), and enqueue
   the trial slots still missing from ``search.n_trials``.
3. Start ``search.n_workers`` workers (processes here; or one job each through a non-basic
   ``hydra/launcher``) and wait; a worker that dies has its trial retried and is replaced.
4. Write summary.csv, best.yaml, the study TensorBoard run; print the leaderboard. Exit 1 when
   ``search.max_failures`` trials failed in a row (the sweep stopped) or no trial completed.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.trial import TrialState

from engine import redact
from engine.config import SAMPLERS, ConfigError, check_override_keys, validate
from engine.search import jobs, summary
from engine.search import storage as st
from engine.search.console import first_line, say, threads_each
from engine.search.space import Param, grid, parse_space
from engine.search.spec import Spec

log = logging.getLogger("engine.search")

_SENTINEL = 987654321
_BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# --------------------------------------------------------------------------------------------
# plan


def _subdir_pattern(config: DictConfig) -> str:
    """``hydra.sweep.subdir`` with the Optuna trial number as ``hydra.job.num``."""
    try:
        cfg = copy.deepcopy(config)
        with read_write(cfg.hydra.job), open_dict(cfg.hydra.job):
            cfg.hydra.job.num = _SENTINEL
        text = str(cfg.hydra.sweep.subdir)
    except Exception:
        return "trial_{number}"
    if str(_SENTINEL) not in text or "/" in text.replace(str(_SENTINEL), ""):
        return "trial_{number}"
    return text.replace("{", "{{").replace("}", "}}").replace(str(_SENTINEL), "{number}")


def _corners(space: dict[str, Param]) -> list[dict[str, Any]]:
    """A few points that touch every choice and both bounds of every range."""
    first = {n: (p.choices[0] if p.kind == "choice" else p.low) for n, p in space.items()}
    last = {n: (p.choices[-1] if p.kind == "choice" else p.high) for n, p in space.items()}
    points = [first, last]
    for name, p in space.items():
        if p.kind == "choice":
            points += [dict(first, **{name: c}) for c in p.choices[1:-1]]
    return points


def _check_space(
    config: DictConfig, space: dict[str, Param], fixed: list[str], hydra_context: Any
) -> None:
    """Compose and validate trial configs at the space's corners: fail before any compute."""
    problem = check_override_keys([f"{p.key}=0" for p in space.values()])
    if problem:
        raise ConfigError(f"search space: {problem}")
    if hydra_context is None:
        return
    for point in _corners(space):
        overrides = fixed + [space[n].to_override(v) for n, v in point.items()]
        shown = " ".join(space[n].to_override(v) for n, v in point.items())
        try:
            cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
            with open_dict(cfg):
                del cfg["hydra"]
            validate(cfg)
        except Exception as err:
            raise ConfigError(
                f"search space: the trial config {shown} is invalid: {first_line(err, 2)}"
            ) from err


def resolve_objectives(config: DictConfig) -> tuple[list[str], list[str], list[str]]:
    """(metrics, directions, metric tags) from search.metric(s)/direction(s), ``auto`` resolved
    for the data's task, as trainer.monitor is; the task is learnt without building the data
    (a missing csv file or target column fails here, before any worker starts)."""
    from engine.data import describe_task
    from engine.task import optuna_direction, resolve_monitor

    s = config.search
    task = describe_task(config.data)
    metrics = list(s.metrics) if s.metrics else [s.metric]
    given = list(s.directions) if s.directions else [s.direction] * len(metrics)
    if config.trainer.cv_folds >= 2:  # a trial's metrics are the folds' cv/... means and stds
        from engine import cv

        metrics = [cv.sweep_metric(m, config.trainer.monitor, task) for m in metrics]
        return metrics, [optuna_direction(m, d) for m, d in zip(metrics, given)], cv.tags(task)
    metrics = [resolve_monitor(m, "auto", task)[0] for m in metrics]
    directions = [optuna_direction(m, d) for m, d in zip(metrics, given)]
    return metrics, directions, task.tags()


def _config_sources(config: DictConfig) -> tuple[str, list[str]]:
    primary, extra = "", []
    for source in config.hydra.runtime.config_sources:
        if source.schema != "file":
            continue
        if source.provider == "main":
            primary = source.path
        elif source.provider == "command-line":
            extra.append(f"file://{Path(source.path).resolve()}")
    return str(Path(primary).resolve()), extra


def plan(config: DictConfig, arguments: list[str], hydra_context: Any = None) -> Spec:
    s = config.search
    if s is None:
        raise ConfigError(
            "the engine sweeper needs a search preset: python -m engine.train -m search=tpe "
            f"({', '.join(SAMPLERS)})."
        )
    job = copy.deepcopy(config)
    with open_dict(job):
        del job["hydra"]
    validate(job)
    space, fixed = parse_space(arguments, dict(s.params or {}), job)
    n_trials = s.n_trials
    if s.sampler == "grid":
        size = len(grid(space))
        if n_trials is None or n_trials > size:
            if n_trials is not None:
                say(f"search.n_trials={n_trials} is more than the grid's {size} combinations")
            n_trials = size
    elif n_trials is None:
        raise ConfigError(
            f"search.n_trials=null only works with search=grid; give a number for "
            f"search.sampler={s.sampler}."
        )
    _check_space(config, space, fixed, hydra_context)
    metrics, directions, tags = resolve_objectives(job)
    sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
    config_dir, search_path = _config_sources(config)
    max_epochs = (
        None
        if any(n.endswith("trainer.max_epochs") for n in space)
        else int(job.trainer.max_epochs)
    )
    launcher = OmegaConf.select(config, "hydra.launcher._target_", default=_BASIC_LAUNCHER)
    here = s.launch == "processes" or (s.launch == "auto" and launcher == _BASIC_LAUNCHER)
    if s.gpus_per_trial > 1 and here and job.trainer.device != "cpu":
        # This machine's GPUs are the workers' only when they run here; a launcher's jobs get
        # their own (gpus_per_task), and each worker checks what it got.
        from engine.search.ddp import check_gpus, visible_gpus

        check_gpus(int(s.gpus_per_trial), s.n_workers, visible_gpus())
    return Spec(
        sweep_dir=str(sweep_dir),
        config_dir=config_dir,
        config_name=str(config.hydra.job.config_name),
        search_path=search_path,
        # Every trial's config, its .hydra/ files and TensorBoard text are made from these: a
        # password in them (search.storage=postgresql://u:pw@...) is masked here, once.
        fixed=[redact.mask(o) for o in fixed],
        space={n: p.to_dict() for n, p in space.items()},
        sampler=s.sampler,
        seed=int(s.seed),
        n_trials=int(n_trials),
        pruner=s.pruner,
        wilcoxon_p_threshold=float(s.wilcoxon_p_threshold),
        max_epochs=max_epochs,
        metrics=metrics,
        directions=directions,
        max_failures=int(s.max_failures),
        session=dt.datetime.now().isoformat(),
        metric_tags=tags,
        subdir=_subdir_pattern(config),
        gpus_per_trial=int(s.gpus_per_trial),
    )


# --------------------------------------------------------------------------------------------
# study


def open_study(
    storage: optuna.storages.BaseStorage, name: str, spec: Spec
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it to resume; returns (study, resumed)."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        study = optuna.create_study(study_name=name, storage=storage, directions=spec.directions)
        _name_metrics(study, spec.metrics)
        return study, False
    from engine.search.tb import direction_names

    had = direction_names(study)
    if had != spec.directions:
        raise ConfigError(
            f"study {name!r} optimises {had} but this sweep asks for {spec.directions} "
            f"(search.metric/direction); use another search.study_name or hydra.sweep.dir."
        )
    _name_metrics(study, spec.metrics)  # also names a study created before they were set
    return study, True


def _name_metrics(study: optuna.Study, metrics: list[str]) -> None:
    """optuna-dashboard (and ``trials_dataframe``) label the objectives with these names
    instead of "Objective 0"."""
    import warnings

    if study.metric_names == metrics:
        return
    with warnings.catch_warnings():  # experimental (Optuna 3.2+): no warning on every sweep
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(list(metrics))


def _worker_count(requested: int | None, waiting: int, per_trial: int = 1) -> tuple[int, list[str]]:
    """(number of workers, the ``CUDA_VISIBLE_DEVICES`` of each worker slot: one GPU id, or
    ``per_trial`` of them comma-joined for DDP trials; empty on CPU)."""
    from engine.search.ddp import gpu_slots, visible_gpus

    n, slots = gpu_slots(per_trial, requested, visible_gpus())
    return max(1, min(n, waiting)), slots


def _say_threads(threads: int) -> str:
    return f", {threads} thread{'s' if threads > 1 else ''} each" if threads else ""


class Workers:
    """Worker subprocesses on this machine: one per GPU (pinned), or CPU cores shared out.
    ``gpus`` holds each worker slot's ``CUDA_VISIBLE_DEVICES``: one GPU, or with
    ``search.gpus_per_trial=k`` a group of k ("0,1"), which the trial's ranks share out.

    A storage URL with a password reaches them through their environment; their command line
    (which every local user can read) shows it masked.
    """

    def __init__(self, storage_arg: str, study_name: str, n: int, gpus: list[str]):
        self.storage_arg, self.study_name, self.n, self.gpus = storage_arg, study_name, n, gpus
        self.threads = threads_each(n) if not gpus else 0
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, k: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if redact.has_secret(self.storage_arg):
            env[st.STORAGE_ENV] = self.storage_arg
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[k % len(self.gpus)]
        else:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        cmd = [sys.executable, "-m", "engine.search.worker"]
        cmd += ["--storage", redact.mask(self.storage_arg), "--study", self.study_name]
        cmd += ["--worker", str(k), "--threads", str(self.threads), "--quiet"]
        self.procs[k] = subprocess.Popen(cmd, env=env)

    def exited(self) -> list[tuple[int, int]]:
        done = [(k, p.poll()) for k, p in self.procs.items() if p.poll() is not None]
        for k, _ in done:
            del self.procs[k]
        return done  # type: ignore[return-value]

    def join(self, timeout: float = 60.0) -> None:
        """Wait for workers that are on their way out (their budget is spent)."""
        deadline = time.time() + timeout
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()
        self.procs.clear()

    def stop(self, grace: float = 10.0) -> None:
        deadline = time.time() + grace
        for p in self.procs.values():
            while p.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class Progress:
    """What the sweep command shows while its workers run, read from the study, so it is the
    same whether they run here as processes or elsewhere as launcher jobs: a console line per
    finished trial, and the reports (summary.csv, best.yaml, the study's TensorBoard run, whose
    HPARAMS columns put the swept params first) rewritten as trials finish, at most every
    ``REPORT_EVERY_S``, so ``tensorboard --logdir <sweep dir>`` shows the sweep as it goes."""

    REPORT_EVERY_S = 10.0

    def __init__(self, study: optuna.Study, spec: Spec, sweep_dir: Path):
        self.study, self.spec, self.sweep_dir = study, spec, sweep_dir
        self.since = dt.datetime.fromisoformat(spec.session)
        self.printed: set[int] = set()
        self.suspensions: set[tuple[int, int]] = set()
        self.reported_at = 0.0
        self.unreported = True

    def update(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        from engine.search.worker import suspended_line, trial_line

        done = [
            t
            for t in trials
            if t.state in st.FINISHED
            and t.number not in self.printed
            and t.datetime_complete is not None
            and t.datetime_complete >= self.since
            and not t.user_attrs.get("interrupted")  # reported by the recovery instead
        ]
        for t in sorted(done, key=lambda t: (t.datetime_complete, t.number)):
            self.printed.add(t.number)
            print(trial_line(t, self.spec), flush=True)
        for t in trials:  # preempted, back in the queue with a checkpoint
            info = t.user_attrs.get(st.SUSPENDED_ATTR)
            if (
                t.state == TrialState.WAITING
                and info
                and (t.number, info["count"]) not in self.suspensions
            ):
                self.suspensions.add((t.number, info["count"]))
                print(suspended_line(t.number, info), flush=True)
        self.unreported = self.unreported or bool(done)
        if self.unreported and time.monotonic() - self.reported_at >= self.REPORT_EVERY_S:
            self.report()

    def report(self) -> tuple[str, optuna.trial.FrozenTrial | None]:
        """Rewrite the reports now; return the leaderboard and the best trial."""
        self.reported_at, self.unreported = time.monotonic(), False
        return summary.write_all(self.study, self.spec, self.sweep_dir)


class _Supervisor:
    """Watches the worker processes of one sweep command: restarts one that died while trials
    wait, retries the trials of killed ones, and says when the budget is spent."""

    def __init__(self, sweep: Sweep, workers: Workers, progress: Progress):
        self.sweep, self.workers, self.progress = sweep, workers, progress
        self.study_id = sweep.storage.get_study_id_from_name(sweep.study_name)
        self.restarts, self.max_restarts = 0, 2 * workers.n + 2

    def spent(self) -> bool:
        trials = self.sweep.study.get_trials(deepcopy=False)  # cached: see worker.run_worker
        self.progress.update(trials)
        counted, running, waiting = st.budget(trials)
        return counted >= self.sweep.spec.n_trials and not running and not waiting

    def failing(self) -> bool:
        trials = self.sweep.study.get_trials(deepcopy=False)
        return st.failures_in_a_row(trials, self.sweep.spec.session) >= self.sweep.spec.max_failures

    def can_restart(self) -> bool:
        return (
            bool(_waiting(self.sweep.study))
            and not self.failing()
            and (self.restarts < self.max_restarts)
        )

    def watch(self) -> bool:
        """Until every worker has exited (False) or the budget is spent (True)."""
        while self.workers.procs:
            time.sleep(0.1)
            if self.spent():
                return True
            for k, code in self.workers.exited():
                if code != 0:
                    self.replace(k, code)
        return False

    def replace(self, k: int, code: int) -> None:
        from engine.search.worker import EXIT_PREEMPTED

        lost = st.recover(self.sweep.study, self.sweep.storage)
        retried = f"; trial {', '.join(map(str, lost))} will be retried" if lost else ""
        how = "was stopped by a signal" if code == EXIT_PREEMPTED else f"exited with code {code}"
        say(f"worker {k} {how}{retried}")
        if self.can_restart():
            self.restarts += 1
            self.workers.start(k)

    def retry_interrupted(self) -> bool:
        """Every worker is gone: a trial one of them left RUNNING (it was killed) is failed as
        interrupted and retried by another round of workers. False when there is none to run."""
        lost = st.recover(self.sweep.study, self.sweep.storage)
        if not lost or not self.can_restart():
            return False
        say(f"trial {', '.join(map(str, lost))} was interrupted; retrying it")
        self.restarts += 1
        for k in range(min(self.workers.n, _waiting(self.sweep.study))):
            self.workers.start(k)
        return True


def run_processes(sweep: Sweep, progress: Progress) -> Workers:
    """Start the workers and wait until they exit or every trial of the budget has finished
    (then the summary need not wait for the workers' interpreters to shut down: ``join``)."""
    n, gpus = _worker_count(
        sweep.config.search.n_workers, _waiting(sweep.study), sweep.spec.gpus_per_trial
    )
    where = f"GPUs {','.join(gpus)}" if gpus else "CPU"
    workers = Workers(sweep.storage_arg, sweep.study.study_name, n, gpus)
    say(f"{n} worker{'s' if n > 1 else ''} on {where}{_say_threads(workers.threads)}")
    for k in range(n):
        workers.start(k)
    supervisor = _Supervisor(sweep, workers, progress)
    try:
        while not supervisor.watch() and supervisor.retry_interrupted():
            pass
    except KeyboardInterrupt:
        say("interrupted: stopping the workers (their trials will be retried on a re-run)")
        workers.stop()
        raise
    return workers


# --------------------------------------------------------------------------------------------
# the whole sweep


@dataclass
class Sweep:
    """A sweep command's plan and its opened study."""

    config: DictConfig
    spec: Spec
    sweep_dir: Path
    storage_arg: str
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    study_name: str
    resumed: bool
    hydra_context: Any = None


def open_sweep(config: DictConfig, arguments: list[str], hydra_context: Any) -> Sweep:
    """Plan (every check before any compute), then open the storage and the study; a problem
    a user can fix exits with ``error: ...`` and code 2."""
    from engine.data import DataError

    try:
        spec = plan(config, arguments, hydra_context)
        s = config.search
        sweep_dir = Path(spec.sweep_dir)
        storage_arg = st.storage_arg(s.storage, sweep_dir)
        study_name = s.study_name or sweep_dir.name
        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = st.open_storage(storage_arg)
        if not s.storage and not s.study_name:  # the sweep dir's own journal: its one study
            names = [summary_.study_name for summary_ in storage.get_all_studies()]
            if len(names) == 1 and names[0] != study_name:
                say(f"this sweep dir holds study {names[0]!r}: resuming it")
                study_name = names[0]
        study, resumed = open_study(storage, study_name, spec)
        if s.register:  # a bad model name is refused before any trial runs
            from engine.registry.refs import check_name

            check_name(s.register)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    return Sweep(
        config, spec, sweep_dir, storage_arg, storage, study, study_name, resumed, hydra_context
    )


def prepare(sweep: Sweep) -> int:
    """Store the spec, recover trials left by dead workers, enqueue the missing slots; say where
    the sweep stands. Returns the number of trials waiting to run."""
    spec, storage, study = sweep.spec, sweep.storage, sweep.study
    # What Hydra's own sweeper writes, minus secrets (a password in search.storage is masked;
    # an ${oc.env:...} URL stays unresolved).
    OmegaConf.save(redact.scrub(sweep.config), sweep.sweep_dir / "multirun.yaml")
    study_id = storage.get_study_id_from_name(sweep.study_name)
    if sweep.resumed:
        try:
            old = st.load_spec(storage, study_id)
        except ValueError:
            old = None
        if old is not None and old.space != spec.space:
            say("the search space differs from the study's earlier one; new trials use this one")
    st.save_spec(storage, study_id, spec)
    lost = st.recover(study, storage)
    if lost:
        say(f"trial {', '.join(map(str, lost))} had been interrupted: failed, and retried now")
    st.top_up(study, spec)
    counted, running, waiting = st.budget(study.get_trials(deepcopy=False))
    objectives = " / ".join(f"{m} {d}" for m, d in zip(spec.metrics, spec.directions))
    say(
        f"{'resuming' if sweep.resumed else 'starting'} study {sweep.study_name!r} "
        f"({spec.sampler}, pruner {spec.pruner}, {objectives}): {spec.n_trials} trials, "
        f"{counted} done, {waiting} to run" + (f", {running} running elsewhere" if running else "")
    )
    say(f"sweep dir {sweep.sweep_dir}  storage {redact.mask(sweep.storage_arg)}")
    return waiting


def run_workers(sweep: Sweep, waiting: int, progress: Progress) -> Workers | None:
    """Run the waiting trials: worker processes here, or launcher jobs; returns the processes
    (still exiting) in process mode. Ctrl-C stops them; their trials are retried on a re-run."""
    config, study, storage = sweep.config, sweep.study, sweep.storage
    mode = config.search.launch
    if mode == "auto":
        mode = "processes" if config.hydra.launcher._target_ == _BASIC_LAUNCHER else "launcher"
    workers = None
    try:
        if mode == "launcher":
            jobs.run_launcher(sweep, waiting, progress)
        elif mode == "external":
            jobs.run_external(sweep, progress)
        else:
            workers = run_processes(sweep, progress)
    except KeyboardInterrupt:
        st.recover(study, storage)
        progress.report()
        sys.exit(130)
    st.recover(study, storage)
    progress.update(study.get_trials(deepcopy=False))
    return workers


def register_best(run_dir: Path, name: str) -> None:
    """``search.register=<name>``: the best trial's run dir becomes the model's next version,
    in the registry ``ENGINE_REGISTRY_STORAGE`` names (default ``outputs/registry.db``). A
    refusal exits with code 2; the sweep's reports are written already."""
    import engine.registry.api as api
    from engine.registry.cli import user_errors

    try:
        with api.open_registry() as reg:
            version = api.register(reg, run_dir, name)
    except user_errors() as err:
        print(f"error: search.register={name}: {redact.mask(str(err))}", file=sys.stderr)
        sys.exit(2)
    say(f"registered the best trial as {version.ref}: python -m engine.registry show {version.ref}")


def finish(sweep: Sweep, progress: Progress, started: float) -> None:
    """The reports and the leaderboard; exit code 1 when the sweep stopped on failures or no
    trial completed."""
    spec, study, sweep_dir = sweep.spec, sweep.study, sweep.sweep_dir
    board, best = progress.report()
    print(board, flush=True)
    say(f"took {time.perf_counter() - started:.1f}s; summary: {sweep_dir / 'summary.csv'}")
    if best is not None:
        say(
            f"best: trial {best.number}, reproduce with: python -m engine.train "
            f"--config-dir {sweep_dir} --config-name best"
        )
    if best is not None and sweep.config.search.register:
        register_best(summary.trial_dir(best, spec, sweep_dir), sweep.config.search.register)
    trials = study.get_trials(deepcopy=False)
    failing = st.failures_in_a_row(trials, spec.session)
    if failing >= spec.max_failures and _waiting(study):
        reasons = [
            t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL
        ]
        say(
            f"error: the sweep stopped: {failing} trials in a row failed "
            f"(search.max_failures={spec.max_failures}); last reason: "
            f"{reasons[-1] if reasons else '?'}. Fix the config or space, then re-run the same "
            f"command to resume."
        )
        sys.exit(1)
    if best is None and not _waiting(study):
        say("error: no trial completed; see fail_reason in summary.csv and the trials' train.log")
        sys.exit(1)


def run_sweep(config: DictConfig, arguments: list[str], hydra_context: Any = None) -> optuna.Study:
    """The whole sweep command: open, prepare, run the workers, report (module docstring)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    sweep = open_sweep(config, arguments, hydra_context)
    waiting = prepare(sweep)
    progress = Progress(sweep.study, sweep.spec, sweep.sweep_dir)
    progress.report()
    workers = run_workers(sweep, waiting, progress) if waiting else None
    try:
        finish(sweep, progress, started)
    finally:
        if workers is not None:  # their interpreters may still be shutting down
            workers.join()
    return sweep.study
