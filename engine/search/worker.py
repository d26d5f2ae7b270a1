"""A worker: claim a trial, compose its config, run it in-process, tell the result, repeat.

``python -m engine.search.worker --storage URL_OR_JOURNAL --study NAME`` runs one; the sweep
driver starts ``search.n_workers`` of them, and on a cluster each job (one per GPU or node) runs
one against the same study. A worker imports torch and the engine once and runs trials back to
back with :func:`engine.train.run`, so a trial costs its training and little more; a trial that
finishes or is pruned frees its device for the next one at once.

A trial is an ordinary run: its config is composed by Hydra's compose API from the primary config,
the sweep's fixed overrides and the trial's params; it gets its own run dir
(``<sweep dir>/trial_<number>``: ``.hydra/``, ``metrics.json``, ``checkpoints/``, ``tb/``,
``train.log``). The trainer reports the objective after every epoch (engine.search.pruners), so
pruners stop it in the middle; a cross-validation trial (``trainer.cv_folds``) reports after
every fold instead, and its folds are ``fold_<i>/`` run dirs inside the trial's. Its HPARAMS session is written when it ends, with ``trial.number``
and ``trial.state`` (complete, pruned, failed) among the hparams and ``trial/value`` as a metric.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.trial import TrialState

from engine import preempt
from engine.runlog import also_log_to
from engine.search import storage as st
from engine.search.pruners import Pruned, Reporter, make_pruner
from engine.search.samplers import make_sampler, trial_seed
from engine.search.spec import Spec
from engine.trainer import Preempted

log = logging.getLogger("engine.search")

# A worker stopped from outside (SIGTERM, SIGUSR2) after handing its trial back: not a crash.
EXIT_PREEMPTED = 75

_HPARAMS_STATUS = {TrialState.COMPLETE: "success", TrialState.PRUNED: Pruned.hparams_status}


class Composer:
    """Composes trial configs with Hydra's compose API (initialised once per process)."""

    def __init__(self, spec: Spec):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from engine.config import register_configs

        register_configs()  # the typed schema (train_schema) the primary config starts from

        self.config_name = spec.config_name
        self.extra = []
        if spec.search_path:
            self.extra = ["hydra.searchpath=[" + ",".join(spec.search_path) + "]"]
        if not GlobalHydra.instance().is_initialized():  # inside a Hydra job it already is
            self._init = initialize_config_dir(
                config_dir=spec.config_dir, version_base="1.3", job_name="train"
            )

    @functools.cached_property
    def log_format(self) -> str:
        """The primary config's train.log format (``hydra.job_logging``), for the trials' logs."""
        from hydra import compose

        hydra = compose(self.config_name, overrides=self.extra, return_hydra_config=True).hydra
        fmt = OmegaConf.select(hydra, "job_logging.formatters.file.format", default=None)
        return fmt or logging.BASIC_FORMAT

    def compose(self, overrides: list[str]) -> tuple[DictConfig, DictConfig]:
        """(the trial's config, its ``hydra`` node for .hydra/hydra.yaml)."""
        from hydra import compose

        cfg = compose(
            config_name=self.config_name,
            overrides=self.extra + overrides,
            return_hydra_config=True,
        )
        with open_dict(cfg):
            hydra = cfg.pop("hydra")
        return cfg, hydra


def trial_overrides(spec: Spec, params: dict[str, Any]) -> list[str]:
    space = spec.params()
    fixed = list(spec.fixed)
    if not any(o.split("=", 1)[0].lstrip("+~") == "trainer.resume" for o in fixed):
        fixed.append("trainer.resume=never")  # a trial folder is new; never pick up a stranger's
    return fixed + [space[name].to_override(params[name]) for name in space if name in params]


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and math.isfinite(float(v))
    }


def _write_hydra_dir(
    run_dir: Path, cfg: DictConfig, hydra: DictConfig, overrides: list[str], number: int
) -> None:
    """What Hydra writes for a job: config.yaml, hydra.yaml (with the trial's number and run
    dir filled in) and overrides.yaml."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    with read_write(hydra), open_dict(hydra):
        hydra.job.num = number
        hydra.runtime.output_dir = str(run_dir.resolve())
        hydra.sweep.dir = str(run_dir.resolve().parent)
    OmegaConf.save(cfg, hydra_dir / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hydra}), hydra_dir / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(overrides), hydra_dir / "overrides.yaml")


def _write_session(
    run_dir: Path,
    number: int,
    state: TrialState,
    cfg: DictConfig | None,
    params: dict[str, Any],
    value: float | None,
    step: int,
) -> None:
    """The trial's HPARAMS session (start and end together) and its ``trial/value`` scalar."""
    from engine.search.tb import write_trial_session

    hparams: dict[str, Any] = {}
    if cfg is not None:
        from engine.tb import flatten

        hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
        hparams = {k: v for k, v in hparams.items() if not k.startswith("search.")}
    # The params too: a config-group choice (model=cnn) is not a key of the flattened config.
    hparams.update({k: v for k, v in params.items() if v is not None})
    hparams["trial.number"] = number
    hparams["trial.state"] = st.STATE_NAMES[state]
    write_trial_session(run_dir / "tb", hparams, _HPARAMS_STATUS.get(state, "failure"), value, step)


@dataclass
class Outcome:
    """How a trial's run ended, and what it left to record."""

    state: TrialState
    cfg: DictConfig | None = None
    params: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    values: list[float] | None = None
    reason: str = ""
    run_seconds: float = 0.0  # inside engine.train.run
    preempted: Preempted | None = None  # stopped from outside, with a checkpoint to resume

    def shown(self, spec: Spec) -> float | None:
        """The value its console line and HPARAMS show: the objective, or for a pruned trial the
        last value it reported."""
        if self.state == TrialState.PRUNED and spec.metrics[0] in self.results:
            return float(self.results[spec.metrics[0]])
        return self.values[0] if self.values else None


def trial_log(run_dir: Path, log_format: str):
    """Everything logged while the trial runs also goes to its own ``train.log``."""
    return also_log_to(run_dir / "train.log", logging.Formatter(log_format))


def _execute(
    trial: optuna.Trial,
    spec: Spec,
    composer: Composer,
    run_dir: Path,
    reporter: Reporter,
    resume: str | None = None,
) -> Outcome:
    """Draw the params, compose the config, run it; a failure is an outcome, not an exception
    (its traceback goes to the trial's train.log, the console gets the one-line reason).

    ``resume``: the checkpoint of a preempted attempt of this trial, to continue from (its
    .hydra/ files still show the trial's own config, which starts afresh)."""
    from engine.train import run

    out = Outcome(TrialState.RUNNING)
    try:
        out.params = {name: p.suggest(trial) for name, p in spec.params().items()}
        overrides = trial_overrides(spec, out.params)
        out.cfg, hydra = composer.compose(overrides)
        _write_hydra_dir(run_dir, out.cfg, hydra, overrides, trial.number)
        run_cfg = out.cfg
        if resume:
            run_cfg = copy.deepcopy(out.cfg)
            run_cfg.trainer.resume = resume
        run_started = time.perf_counter()
        try:
            if spec.gpus_per_trial > 1:  # k DDP ranks launched from here (engine/search/ddp.py)
                from engine.search.ddp import run_ranks

                k, log_format = spec.gpus_per_trial, composer.log_format
                out.results = run_ranks(k, run_cfg, run_dir, trial, spec, reporter, log_format)
            else:
                # Under cross-validation (trainer.cv_folds) the run reports per fold instead.
                out.results = run(
                    run_cfg,
                    run_dir,
                    epoch_callback=reporter,
                    fold_callback=reporter.fold,
                    hparams_session=False,
                )
        finally:
            out.run_seconds = time.perf_counter() - run_started
        missing = [m for m in spec.metrics if m not in out.results]
        if missing:
            raise ValueError(
                f"search.metric={missing[0]} is not in the run's metrics.json "
                f"({', '.join(sorted(out.results))}); pick one of them."
            )
        out.values = [float(out.results[m]) for m in spec.metrics]
        bad = [m for m, v in zip(spec.metrics, out.values) if not math.isfinite(v)]
        if bad:
            raise ValueError(f"{bad[0]} is not finite ({out.results[bad[0]]})")
        out.state = TrialState.COMPLETE
    except Pruned as pruned:
        out.state, out.results = TrialState.PRUNED, reporter.last
        log.info("trial %d: %s", trial.number, pruned)
    except Preempted as stop:  # still RUNNING: run_trial hands it back to the queue
        out.preempted, out.results = stop, reporter.last
        log.info("trial %d: %s", trial.number, stop)
    except Exception as err:
        out.state, out.reason = TrialState.FAIL, f"{type(err).__name__}: {err}"
        out.results = out.results or reporter.last
        log.info("trial %d failed: %s\n%s", trial.number, out.reason, traceback.format_exc())
    return out


def _record(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: Spec,
    out: Outcome,
    run_dir: Path,
    seconds: float,
    epochs: int,
) -> None:
    """The trial's attributes (metrics, seconds, reason), its HPARAMS session, then its end."""
    trial.set_user_attr("metrics", _finite(out.results))
    trial.set_user_attr("seconds", round(seconds, 4))
    trial.set_user_attr("run_seconds", round(out.run_seconds, 4))
    if out.reason:
        trial.set_user_attr("fail_reason", out.reason[:2000])
    shown = out.shown(spec)
    try:
        _write_session(run_dir, trial.number, out.state, out.cfg, out.params, shown, epochs)
    except Exception as err:  # TensorBoard output must not lose the trial's result
        log.warning("trial %d: could not write its HPARAMS session: %s", trial.number, err)
    if shown is not None:
        trial.set_user_attr("shown_value", shown)
    study.tell(trial, out.values if out.state == TrialState.COMPLETE else None, state=out.state)


def run_trial(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    spec: Spec,
    frozen: optuna.trial.FrozenTrial,
    composer: Composer,
    sweep_dir: Path,
    worker: int = 0,
    quiet: bool = False,
) -> TrialState:
    """Run one claimed (RUNNING) trial to its end and tell the study; ``quiet``: no console line
    (the sweep command that started this worker prints every trial's line itself)."""
    import torch

    number = frozen.number
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec.sampler, trial_seed(spec.seed, number), spec.n_trials),
        pruner=make_pruner(spec.pruner, spec.max_epochs, spec.wilcoxon_p_threshold),
    )
    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    run_dir = Path(sweep_dir) / spec.subdir.format(number=number)
    # For an RDB storage the study works through Optuna's caching wrapper, and the claim went
    # around it: the wrapper knows only trials it has read, and a parameter draw on one it never
    # saw is a KeyError (TPE reads every trial before drawing; random and grid do not). Reading
    # the running trials puts the claimed one in its cache.
    study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    trial = optuna.Trial(study, trial_id)
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("worker_index", worker)
    run_dir.mkdir(parents=True, exist_ok=True)
    reporter = Reporter(trial, spec.metrics)
    suspended = frozen.user_attrs.get(st.SUSPENDED_ATTR) or {}
    resume = (
        suspended.get("checkpoint") if Path(suspended.get("checkpoint", "")).is_file() else None
    )
    started = time.perf_counter()
    with trial_log(run_dir, composer.log_format):
        threads = torch.get_num_threads()
        log.info("trial %d on worker %d (%s, %d torch threads)", number, worker, st.HOST, threads)
        if resume:
            log.info("trial %d resumes from %s (step %s)", number, resume, suspended.get("step"))
        try:
            with st.Heartbeat(storage, trial_id):
                out = _execute(trial, spec, composer, run_dir, reporter, resume)
        except BaseException:  # Ctrl-C, a second signal: not a failure of its own; retry it
            st.fail_interrupted(study, frozen, "interrupted: its worker was stopped", storage)
            raise
    seconds = time.perf_counter() - started + float(suspended.get("seconds", 0.0))
    if out.preempted is not None:
        _suspend(storage, study_id, frozen, out.preempted, suspended, seconds, quiet)
        return TrialState.WAITING
    _record(study, trial, spec, out, run_dir, seconds, reporter.epochs)
    if not quiet:
        done = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        print(trial_line(done, spec), flush=True)
    return out.state


def _suspend(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    frozen: optuna.trial.FrozenTrial,
    stop: Preempted,
    before: dict[str, Any],
    seconds: float,
    quiet: bool,
) -> None:
    """Put a preempted trial back in the queue, to resume from its checkpoint."""
    info = {
        "checkpoint": str(stop.checkpoint),
        "step": stop.step,
        "reason": stop.reason,
        "count": int(before.get("count", 0)) + 1,
        "seconds": round(seconds, 4),
    }
    st.suspend(storage, study_id, frozen.number, info)
    if not quiet:
        print(suspended_line(frozen.number, info), flush=True)


def suspended_line(number: int, info: dict[str, Any]) -> str:
    return (
        f"[sweep] trial {number} suspended at step {info['step']} ({info['reason']}): it "
        f"resumes from its checkpoint"
    )


def trial_line(t: optuna.trial.FrozenTrial, spec: Spec) -> str:
    """The console line of a finished trial, the same whoever prints it (a worker, or the sweep
    command watching the study while its workers run as processes or launcher jobs)."""
    value = t.user_attrs.get("shown_value")
    shown = f"{spec.metrics[0]}={value:.4f}" if value is not None else ""
    text = "  ".join(f"{k}={_short(v)}" for k, v in t.params.items())
    reason = t.user_attrs.get("fail_reason", "")
    why = f"  ({reason.splitlines()[0][:160]})" if reason else ""
    seconds = float(t.user_attrs.get("seconds", 0.0))
    return (
        f"[sweep] trial {t.number} {st.STATE_NAMES[t.state]:<8} {shown:<16} {text}  "
        f"{seconds:.1f}s  w{t.user_attrs.get('worker_index', '?')}{why}"
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run_worker(
    storage_arg: str,
    study_name: str,
    *,
    worker: int = 0,
    sweep_dir: str | None = None,
    threads: int = 0,
    quiet: bool = False,
) -> int:
    """Run trials until none is waiting, the budget is spent, or too many failed in a row.

    ``storage_arg`` may be a masked URL (its password then comes from the environment, see
    ``storage.resolve_storage``). ``threads``: torch CPU threads, at most the CPUs this process
    may run on (0: torch's default). Returns the number of trials this worker ran.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threads:
        import torch

        torch.set_num_threads(max(1, min(threads, st.cpu_count())))
    storage = st.open_storage(st.resolve_storage(storage_arg))
    study_id = storage.get_study_id_from_name(study_name)
    spec = st.load_spec(storage, study_id)
    composer = Composer(spec)
    # Reads go through the study's storage, which for a database caches finished trials and
    # fetches only the rest: reading the whole study from PostgreSQL every trial cost 0.1 s at
    # 100 trials and 0.7 s at 1,000 (benchmarks/RESULTS.md, sweep scale).
    reader = optuna.load_study(study_name=study_name, storage=storage)
    ran = 0
    while not preempt.requested():
        spec = st.load_spec(storage, study_id)  # a re-run may have raised n_trials meanwhile
        trials = reader.get_trials(deepcopy=False)
        counted, running, _ = st.budget(trials)
        if counted + running >= spec.n_trials:
            break
        if st.failures_in_a_row(trials, spec.session) >= spec.max_failures:
            break
        frozen = st.claim(storage, study_id, worker)
        if frozen is None:
            break
        run_trial(
            storage,
            study_name,
            spec,
            frozen,
            composer,
            Path(sweep_dir or spec.sweep_dir),
            worker,
            quiet,
        )
        ran += 1
    return ran


def wait_for_study(storage_arg: str | None, study_name: str, seconds: float) -> None:
    """Block until the study exists with its spec (and its database answers), at most
    ``seconds``: workers started beside the command that creates the study (a Kubernetes
    Indexed Job, jobs submitted by hand) may come up first."""
    deadline = time.monotonic() + seconds
    while not preempt.requested():  # a pod deleted while it waits stops at once
        try:
            storage = st.open_storage(st.resolve_storage(storage_arg))
            st.load_spec(storage, storage.get_study_id_from_name(study_name))
            return
        except Exception as err:  # not there yet: no study, no spec, no database
            if time.monotonic() >= deadline:
                raise KeyError(
                    f"study {study_name!r} did not appear within {seconds:.0f} s "
                    f"(--wait-for-study): {err}"
                ) from err
        time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))


def launcher_job(cfg: DictConfig) -> None:
    """The task function of the jobs a sweep hands to a Hydra launcher (SLURM, submitit_local):
    each job is one worker, told by the sweep which study, which index and how many threads.

    SLURM's warning before a time limit (SIGUSR2, the presets' ``signal_delay_s``) or a
    preemption (SIGTERM) checkpoints the running trial and hands it back to the queue; then the
    job runner's own SIGUSR2 handler (submitit's: requeue the job) runs, so the job comes back
    and resumes the trial even with no sweep command watching."""
    import torch

    s = cfg.search
    # On a GPU the job takes torch's default threads, as a worker process does.
    threads = 0 if torch.cuda.is_available() else s.worker_threads
    # Off the main thread this job runs inside the sweep command (Hydra's basic launcher),
    # which prints every trial's line itself; a job of its own prints them to its log.
    in_sweep_command = not preempt.install()
    run_worker(s.storage, s.study_name, worker=s.worker, threads=threads, quiet=in_sweep_command)
    reason = preempt.requested()
    requeue = preempt.previous(preempt.signal_number(reason) or 0) if reason else None
    if reason == "SIGUSR2" and requeue is not None:
        log.warning("worker %s: %s; handing over to the job runner to requeue", s.worker, reason)
        requeue(signal.SIGUSR2, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.search.worker",
        description="Run trials of an engine sweep's study until its budget is spent.",
    )
    parser.add_argument(
        "--storage",
        help=f"Optuna URL, or a journal file path (default: ${st.STORAGE_ENV}, the way to pass a "
        f"URL with a password)",
    )
    parser.add_argument("--study", required=True, help="study name (search.study_name)")
    parser.add_argument("--sweep-dir", help="where trial folders go (default: the study's)")
    parser.add_argument("--worker", type=int, default=0, help="worker index, for the log")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument(
        "--quiet", action="store_true", help="no line per trial (the sweep command prints them)"
    )
    parser.add_argument(
        "--wait-for-study",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for the study to be created (workers started first)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for handler in logging.getLogger().handlers:  # the console gets warnings; train.log all
        handler.setLevel(logging.WARNING)
    # SIGTERM (a preemption, the sweep command stopping its workers) and SIGUSR2 (a time limit
    # ahead): the running trial checkpoints at its next step and goes back to the queue.
    preempt.install()
    try:
        if args.wait_for_study > 0:
            wait_for_study(args.storage, args.study, args.wait_for_study)
            if preempt.requested():
                return EXIT_PREEMPTED
        run_worker(
            args.storage,
            args.study,
            worker=args.worker,
            sweep_dir=args.sweep_dir,
            threads=args.threads,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        return 130
    except (KeyError, ValueError) as err:  # no such study, or not an engine sweep
        print(f"error: {err}", file=sys.stderr)
        return 2
    return EXIT_PREEMPTED if preempt.requested() else 0


if __name__ == "__main__":
    code = main()
    # Everything is in the storage and on disk (writers closed, files flushed): skip the slow
    # interpreter teardown of torch and friends, so the next sweep step starts sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
