"""Entry point: ``python -m engine.train [overrides]`` (and ``-m search=...`` to sweep).

config -> build (data, model, loss, optimizer) -> fit -> test with the best weights -> log.
``run`` is the whole job as a function; a sweep trial calls it too, in its own run dir.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.errors import ConfigCompositionException, OverrideParseException, SearchPathException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, ValidationError

from engine import checkpoint as ckpt
from engine import cv, datacard
from engine import distributed as dist
from engine.config import (
    CONF_DIR,
    ConfigError,
    check_command_line,
    describe_config_error,
    register_configs,
    validate,
)
from engine.data import (
    BatchLoader,
    DataError,
    DataInfo,
    Table,
    build_dataset,
    dataset_from_table,
    split_table,
    write_data_info,
)
from engine.faults import Faults
from engine.losses import Objective, resolve_loss_name
from engine.models import build_model, check_model_fits
from engine.optim import build_optimizer, build_scheduler
from engine.task import Task
from engine.tb import NullLogger, TBLogger, flatten
from engine.trainer import NonFiniteError, StopRun, Trainer, pick_device, pick_precision

log = logging.getLogger("engine")

# Errors a user can fix from the message alone: shown without a traceback, exit code 2. Not a
# bare ValueError: a library's one does not name the key; the engine raises ConfigError/DataError.
USER_ERRORS = (ConfigError, DataError, ckpt.CheckpointError, NonFiniteError)
# Hydra's and OmegaConf's refusals of the config (a wrong type, a missing group option, a bad
# override): user errors too, reworded by describe_config_error to name the key.
CONFIG_ERRORS = (
    ConfigCompositionException,
    OverrideParseException,
    SearchPathException,
    ValidationError,
    InterpolationResolutionError,
)

# What a resumed run must share with the run that wrote the checkpoint. Every optim and sched
# value: their state (param groups, base lrs) comes back from the checkpoint, so a changed one
# would be silently ignored (trainer.init_from is the way to change them).
_RESUME_KEYS = (
    "data",
    "model",
    "loss",
    "optim",
    "sched",
    "trainer.seed",
    "trainer.accumulate_grad_batches",
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_metrics_factory(info: DataInfo, device: torch.device) -> Callable[[], Any]:
    from engine.metrics import ClassificationMetrics, RegressionMetrics

    if info.task == "regression":
        return lambda: RegressionMetrics().to(device)
    return lambda: ClassificationMetrics(info.num_classes).to(device)


def check_compile_supported(device: torch.device) -> None:
    """``trainer.compile=true`` fails late and obscurely where torch.compile cannot work: say so
    before any compute."""
    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            f"trainer.compile=true: torch.compile is not supported with this Python/torch "
            f"({sys.version.split()[0]}, torch {torch.__version__}); set trainer.compile=false."
        )
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "g++")
        if shutil.which(compiler) is None:
            raise ConfigError(
                f"trainer.compile=true on the CPU needs a C++ compiler, and '{compiler}' (from $CXX "
                f"or the default g++) was not found; install one (e.g. Debian's g++), point CXX at "
                f"it, or set trainer.compile=false."
            )


def _fingerprint(cfg: DictConfig) -> dict[str, Any]:
    container = OmegaConf.to_container(cfg, resolve=True)
    flat = flatten(container)
    return {
        k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in _RESUME_KEYS)
    }


def _resume_path(setting: str, run_dir: Path) -> Path | None:
    if setting == "never":
        return None
    if setting == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.exists() else None
    return Path(setting).expanduser()


@dataclass
class Runtime:
    """Where a run computes: its device and precision, and its place in a DDP group."""

    device: torch.device
    precision: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Data:
    """The data of a run: what the model and metrics need to know of it, and its loaders."""

    info: DataInfo
    train: BatchLoader
    val: BatchLoader | None
    test: BatchLoader
    rows: tuple[int, int, int]  # train, val, test
    card: dict[str, Any] | None = None  # the data card (engine/datacard.py), written by rank 0


@dataclass
class Components:
    """What training updates: the model (and its DDP / compiled wrapper), loss, optimizer, LR."""

    model: torch.nn.Module
    wrapped: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any


@dataclass
class Job:
    """Everything a run builds before training; ``run`` = ``build_job`` + ``finish_job``."""

    cfg: DictConfig
    run_dir: Path
    trainer: Trainer
    model: torch.nn.Module
    info: DataInfo
    test_loader: BatchLoader
    logger: Any
    is_main: bool
    hparams_session: bool = True


def setup_runtime(t: Any) -> Runtime:
    """Threads, device, precision, the DDP group (under torchrun) and the seeds."""
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    device = dist.local_device(pick_device(t.device))
    precision = pick_precision(t.precision, device)
    if t.compile:
        check_compile_supported(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world_size = dist.init(device)
    if rank != 0:  # one console and one train.log voice: rank 0's
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(t.seed)
    return Runtime(device, precision, rank, world_size)


def build_data(cfg: DictConfig, t: Any, rt: Runtime, table: Table | None = None) -> Data:
    """The dataset, split, on the device when it fits, behind this rank's loaders; ``table``:
    rows already split another way (a cross-validation fold) instead of ``data``'s own split."""
    if cfg.data.name == "text":
        dataset = build_dataset(cfg.data)
        card = datacard.describe_text(cfg.data, dataset) if rt.is_main else None
    else:
        table = table if table is not None else split_table(cfg.data)
        dataset = dataset_from_table(table, cfg.data.standardize)
        card = datacard.describe_table(cfg.data, table, dataset.info) if rt.is_main else None
    return data_from_dataset(cfg, t, rt, dataset, card)


def data_from_dataset(
    cfg: DictConfig, t: Any, rt: Runtime, dataset: Any, card: dict[str, Any] | None
) -> Data:
    """A built dataset's splits on the device when they fit, behind this rank's loaders."""
    info = dataset.info
    resolve_loss_name(cfg.loss, info)  # a loss that does not fit the task fails before any compute
    splits = {k: getattr(dataset, k) for k in ("train", "val", "test")}
    if cfg.data.on_device:
        splits = {k: (v.to(rt.device) if v is not None else None) for k, v in splits.items()}
    share = {"rank": rt.rank, "world_size": rt.world_size}
    train = BatchLoader(splits["train"], cfg.data.batch_size, shuffle=True, seed=t.seed, **share)

    def eval_loader(split):
        if split is None:
            return None
        return BatchLoader(split, cfg.data.eval_batch_size, shuffle=False, **share)

    rows = tuple(len(splits[k]) if splits[k] is not None else 0 for k in ("train", "val", "test"))
    return Data(info, train, eval_loader(splits["val"]), eval_loader(splits["test"]), rows, card)


def build_components(cfg: DictConfig, t: Any, rt: Runtime, data: Data) -> Components:
    """Model (sized against the device's memory first), objective, optimizer and LR schedule."""
    check_model_fits(cfg.model, data.info, rt.device)
    model = build_model(cfg.model, data.info).to(rt.device)
    fused_head = bool(cfg.model.fused_head) and cfg.loss.fused
    objective = Objective(cfg.loss, data.info, fused_head=fused_head)
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_epoch = -(-len(data.train) // t.accumulate_grad_batches)
    scheduler = build_scheduler(
        OmegaConf.to_object(cfg.sched), optimizer, steps_per_epoch * t.max_epochs, steps_per_epoch
    )
    wrapped: torch.nn.Module = model
    if rt.world_size > 1:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if t.compile:
        wrapped = torch.compile(wrapped)
    return Components(model, wrapped, objective, optimizer, scheduler)


def build_trainer(
    cfg: DictConfig,
    t: Any,
    run_dir: Path,
    rt: Runtime,
    data: Data,
    parts: Components,
    epoch_callback: Callable[..., None] | None,
) -> tuple[Trainer, bool]:
    """The trainer, resumed from the run dir's (or the given) checkpoint or started from
    ``trainer.init_from``'s weights; returns it and whether it resumed."""
    resume = _resume_path(t.resume, run_dir)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_data_info(data.info, run_dir)
        if data.card is not None:
            datacard.write(data.card, run_dir)
        for path in ckpt.remove_stale_temporaries(run_dir / "checkpoints"):
            log.info("removed %s, left half-written by an interrupted save", path.name)
    trainer = Trainer(
        t,
        model=parts.wrapped,
        objective=parts.objective,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        train_loader=data.train,
        val_loader=data.val,
        make_metrics=make_metrics_factory(data.info, rt.device),
        info=data.info,
        device=rt.device,
        precision=rt.precision,
        run_dir=run_dir,
        logger=NullLogger(),
        rank=rt.rank,
        world_size=rt.world_size,
        epoch_callback=epoch_callback,
        config_fingerprint=_fingerprint(cfg),
        faults=Faults.from_env(),
    )
    if resume is not None:
        trainer.resume_from(resume)
        if t.init_from:  # e.g. the same command re-run after a kill: go on, do not start over
            log.info("trainer.init_from=%s not applied: resuming from %s", t.init_from, resume)
    elif t.init_from:
        trainer.init_weights_from(t.init_from)
    return trainer, resume is not None


def attach_logger(
    cfg: DictConfig, run_dir: Path, trainer: Trainer, resumed: bool, group: str, session: bool
) -> TBLogger:
    """The run's TensorBoard writer (rank 0): the config as text and, unless a sweep writes it
    itself, the HPARAMS session's start. A resumed run purges what the killed one logged after
    its last checkpoint."""
    logger = TBLogger(run_dir / "tb", purge_step=trainer.state.global_step + 1 if resumed else None)
    trainer.logger = logger
    logger.text("config", "```yaml\n" + OmegaConf.to_yaml(cfg) + "\n```")
    if session:
        hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
        hparams.pop("search", None)
        logger.hparams_start(hparams, Task.of(trainer.info).tags(), group=group)
    return logger


def build_job(
    cfg: DictConfig,
    run_dir: Path,
    *,
    epoch_callback: Callable[..., None] | None = None,
    hparams_group: str = "",
    hparams_session: bool = True,
    table: Table | None = None,
) -> Job:
    """Validate, then build the runtime, data, components and trainer (resumed if asked).

    ``hparams_session=False`` leaves the HPARAMS session to the caller (a sweep writes it when the
    trial ends, with the trial's state among the hparams). ``table``: a fold's split rows
    (engine/cv.py) instead of the config's split."""
    validate(cfg)
    run_dir = Path(run_dir)
    # Plain dataclasses from here on: OmegaConf attribute access is too slow for a per-step path.
    t = OmegaConf.to_object(cfg.trainer)
    rt = setup_runtime(t)
    data = build_data(cfg, t, rt, table)
    parts = build_components(cfg, t, rt, data)
    trainer, resumed = build_trainer(cfg, t, run_dir, rt, data, parts, epoch_callback)
    logger: Any = NullLogger()
    if rt.is_main:
        logger = attach_logger(cfg, run_dir, trainer, resumed, hparams_group, hparams_session)
    log.info(
        "data=%s (%s, %d train / %d val / %d test rows)  model=%s (%.3gM params)  device=%s  precision=%s%s",
        cfg.data.name,
        data.info.task,
        *data.rows,
        cfg.model.name,
        sum(p.numel() for p in parts.model.parameters()) / 1e6,
        rt.device,
        rt.precision,
        f"  world_size={rt.world_size}" if rt.world_size > 1 else "",
    )
    return Job(
        cfg,
        run_dir,
        trainer,
        parts.model,
        data.info,
        data.test,
        logger,
        rt.is_main,
        hparams_session,
    )


def finish_job(job: Job) -> dict[str, float]:
    """Fit (unless the resumed run had finished), test with the best weights, write the results."""
    trainer, t, logger = job.trainer, job.trainer.cfg, job.logger
    status = "failure"
    try:
        best_val = (
            trainer.fit() if trainer.state.epoch < t.max_epochs else trainer.state.best_metrics
        )
        if trainer.stop_reason:
            log.info(trainer.stop_reason)
        # Rank 0 writes best.pt; the other ranks read it only once rank 0's fit has put it on disk,
        # or they would test a stale (or no) best model beside rank 0's.
        dist.barrier()
        best = job.run_dir / "checkpoints" / "best.pt"
        if best.exists() and t.save_checkpoints:
            job.model.load_state_dict(ckpt.load(best)["model"])
        test = trainer.evaluate(job.test_loader, "test")
        results = {k: v for k, v in best_val.items() if k.startswith("val/")}
        results["train/loss"] = trainer.state.last_metrics.get("train/loss", float("nan"))
        results.update(test)
        if job.is_main:
            logger.scalars(test, trainer.state.global_step)
            if job.info.task == "classification":
                _log_figures(logger, trainer.eval_metrics, job.info, trainer.state.global_step)
        status = "success"
    except StopRun as stop:  # e.g. a sweep's pruner: not a failure, HPARAMS shows its status
        status = stop.hparams_status
        raise
    finally:
        if job.is_main:
            if job.hparams_session:
                logger.hparams_end(status)
            logger.close()
    if job.is_main:
        (job.run_dir / "metrics.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        log.info("%s", format_table(results))
        log.info("run dir: %s", job.run_dir)
    return results


def run(
    cfg: DictConfig,
    run_dir: Path,
    *,
    fold_callback: Callable[..., None] | None = None,
    **job_options: Any,
) -> dict[str, float]:
    """Train and test one configuration in ``run_dir``; return the flat metrics dict.

    ``trainer.cv_folds >= 2``: the k folds instead (engine/cv.py), each a run of its own; a
    sweep's ``fold_callback`` then hears of every finished fold (its ``epoch_callback`` of none:
    a trial reports per fold)."""
    if cfg.trainer.cv_folds >= 2:
        job_options.pop("epoch_callback", None)
        return cv.run_folds(cfg, Path(run_dir), run, fold_callback=fold_callback, **job_options)
    return finish_job(build_job(cfg, run_dir, **job_options))


def _log_figures(logger: TBLogger, metrics: Any, info: DataInfo, step: int) -> None:
    try:
        from engine.plots import log_classification_figures
    except ImportError:
        return
    log_classification_figures(logger.writer, metrics, info.class_names, step)


def format_table(results: dict[str, float]) -> str:
    """Final metrics as a two-column (val, test) table."""
    names = sorted({k.split("/", 1)[1] for k in results if k.startswith(("val/", "test/"))})
    rows = [f"{'metric':<12}{'val':>10}{'test':>10}"]
    for name in names:
        cells = [results.get(f"{split}/{name}") for split in ("val", "test")]
        rows.append(
            f"{name:<12}" + "".join(f"{c:>10.4f}" if c is not None else f"{'-':>10}" for c in cells)
        )
    return "\n".join(rows)


def _traceback_to_log_files() -> None:
    """Keep the traceback of the error being handled in train.log (for bug reports) but off the
    console: the root level (INFO) would drop a DEBUG record before any handler saw it."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: one train.log voice, rank 0's
        return
    record = log.makeRecord(log.name, logging.DEBUG, __file__, 0, "traceback", (), sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


register_configs()
# Set when Hydra hands over the composed config: an OSError before that is about the outputs' folder.
_job_started = False


# An absolute config path: the same conf/ whether this runs as `python -m engine.train` or as the
# installed `engine-train` command (for which Hydra would look for a `conf` Python package).
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    global _job_started
    _job_started = True

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except (*USER_ERRORS, *CONFIG_ERRORS) as err:
        _traceback_to_log_files()
        log.error("error: %s", describe_config_error(err))
        dist.shutdown(wait_for_peers=False)
        sys.exit(2)
    dist.shutdown()
    metric = (cfg.search or {}).get("metric") if cfg.search else None
    return results.get(metric) if metric else None


def _completion_line(line: str) -> str:
    """Hydra's completion query takes the words after ``python <file>.py`` (or an installed
    command) as overrides: for ``python -m engine.train ...`` it would read ``engine.train`` as one
    and fail. Present the line as the command ``engine.train ...`` instead."""
    module = re.match(r"\s*\S*python[\d.]*\s+-m\s+engine\.train(\s|$)", line)
    return f"engine.train {line[module.end() :]}" if module else line


def cli() -> None:
    """``python -m engine.train`` and the ``engine-train`` command (the same program; Hydra's
    bash completion completes installed commands and ``python <file>.py``, not ``python -m``)."""
    if "COMP_LINE" in os.environ and {"-sc", "--shell-completion"} & set(sys.argv):
        os.environ["COMP_LINE"] = _completion_line(os.environ["COMP_LINE"])
    problem = check_command_line(sys.argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *dist.share_run_dir(sys.argv[1:])]
    # Hydra then re-raises a composition error instead of printing it with exit code 1 (and, for
    # a misspelt key, advice to append it with +): the user's errors get `error: <key>: ...` and
    # exit code 2 here, any other exception keeps its traceback (a bug).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CONFIG_ERRORS as err:
        print(f"error: {describe_config_error(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.filename is None or _job_started:
            raise  # a failure inside a run keeps its traceback
        # Before any job started: the run or sweep dir (or a file in it) could not be made. Hydra
        # makes the run dir and train.log first, wherever hydra.run.dir was set (a file too).
        print(
            f"error: could not write {err.filename}: {err.strerror}. Make that folder writable, "
            f"or put the outputs elsewhere with hydra.run.dir=<folder> (hydra.sweep.dir=<folder> "
            f"for -m).",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    cli()
