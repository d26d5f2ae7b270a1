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
pruners stop it in the middle. Its HPARAMS session is written when it ends, with ``trial.number``
and ``trial.state`` (complete, pruned, failed) among the hparams and ``trial/value`` as a metric.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from optuna.trial import TrialState

from engine.search import storage as st
from engine.search.pruners import Pruned, Reporter, make_pruner
from engine.search.samplers import make_sampler, trial_seed
from engine.search.spec import Spec

log = logging.getLogger("engine.search")

STATE_NAMES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
_HPARAMS_STATUS = {TrialState.COMPLETE: "success", TrialState.PRUNED: "unknown"}
_FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


class Composer:
    """Composes trial configs with Hydra's compose API (initialised once per process)."""

    def __init__(self, spec: Spec):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        import engine.train  # noqa: F401  (registers train_schema in the ConfigStore)

        self.config_name = spec.config_name
        self.extra = []
        if spec.search_path:
            self.extra = ["hydra.searchpath=[" + ",".join(spec.search_path) + "]"]
        if not GlobalHydra.instance().is_initialized():  # inside a Hydra job it already is
            self._init = initialize_config_dir(
                config_dir=spec.config_dir, version_base="1.3", job_name="train"
            )

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
    hparams["trial.state"] = STATE_NAMES[state]
    write_trial_session(run_dir / "tb", hparams, _HPARAMS_STATUS.get(state, "failure"), value, step)


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

    from engine.train import run

    number = frozen.number
    study = optuna.load_study(
        study_name=study_name,
        storage=storage,
        sampler=make_sampler(spec.sampler, trial_seed(spec.seed, number), spec.n_trials),
        pruner=make_pruner(spec.pruner, spec.max_epochs),
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
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    logging.getLogger().addHandler(handler)
    log.info(
        "trial %d on worker %d (%s, %d torch threads)",
        number,
        worker,
        st.HOST,
        torch.get_num_threads(),
    )
    started = time.perf_counter()
    run_seconds = 0.0
    cfg: DictConfig | None = None
    params: dict[str, Any] = {}
    results: dict[str, Any] = {}
    values: list[float] | None = None
    reason = ""
    reporter = Reporter(trial, spec.metrics)
    try:
        with st.Heartbeat(storage, trial_id):
            params = {name: p.suggest(trial) for name, p in spec.params().items()}
            overrides = trial_overrides(spec, params)
            cfg, hydra = composer.compose(overrides)
            _write_hydra_dir(run_dir, cfg, hydra, overrides, number)
            run_started = time.perf_counter()
            try:
                results = run(cfg, run_dir, epoch_callback=reporter, hparams_session=False)
            finally:
                run_seconds = time.perf_counter() - run_started
            missing = [m for m in spec.metrics if m not in results]
            if missing:
                raise ValueError(
                    f"search.metric={missing[0]} is not in the run's metrics.json "
                    f"({', '.join(sorted(results))}); pick one of them."
                )
            values = [float(results[m]) for m in spec.metrics]
            bad = [m for m, v in zip(spec.metrics, values) if not math.isfinite(v)]
            if bad:
                raise ValueError(f"{bad[0]} is not finite ({results[bad[0]]})")
        state = TrialState.COMPLETE
    except Pruned as pruned:
        state, results = TrialState.PRUNED, reporter.last
        log.info("trial %d: %s", number, pruned)
    except Exception as err:
        state = TrialState.FAIL
        reason = f"{type(err).__name__}: {err}"
        results = results or reporter.last
        # The traceback goes to the trial's train.log; the console gets the one-line reason.
        log.info("trial %d failed: %s\n%s", number, reason, traceback.format_exc())
    except BaseException:  # Ctrl-C, SIGTERM: the trial did not fail on its own; retry it later
        logging.getLogger().removeHandler(handler)
        handler.close()
        st.fail_interrupted(study, frozen, "interrupted: its worker was stopped", storage)
        raise
    logging.getLogger().removeHandler(handler)
    handler.close()
    seconds = time.perf_counter() - started
    trial.set_user_attr("metrics", _finite(results))
    trial.set_user_attr("seconds", round(seconds, 4))
    trial.set_user_attr("run_seconds", round(run_seconds, 4))  # inside engine.train.run
    if reason:
        trial.set_user_attr("fail_reason", reason[:2000])
    shown = values[0] if values else None
    if state == TrialState.PRUNED and spec.metrics[0] in results:
        shown = float(results[spec.metrics[0]])
    steps = reporter.epochs
    try:
        _write_session(run_dir, number, state, cfg, params, shown, steps)
    except Exception as err:  # TensorBoard output must not lose the trial's result
        log.warning("trial %d: could not write its HPARAMS session: %s", number, err)
    if shown is not None:
        trial.set_user_attr("shown_value", shown)
    study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
    if not quiet:
        done = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        print(trial_line(done, spec), flush=True)
    return state


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
        f"[sweep] trial {t.number} {STATE_NAMES[t.state]:<8} {shown:<16} {text}  "
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
    ran = 0
    while True:
        spec = st.load_spec(storage, study_id)  # a re-run may have raised n_trials meanwhile
        trials = storage.get_all_trials(study_id, deepcopy=False)
        counted, running, _ = st.budget(trials)
        if counted + running >= spec.n_trials:
            break
        if st.failures_in_a_row(trials, spec.session) >= spec.max_failures:
            break
        frozen = st.claim(storage, study_id)
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


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for handler in logging.getLogger().handlers:  # the console gets warnings; train.log all
        handler.setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
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
    return 0


if __name__ == "__main__":
    code = main()
    # Everything is in the storage and on disk (writers closed, files flushed): skip the slow
    # interpreter teardown of torch and friends, so the next sweep step starts sooner.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
