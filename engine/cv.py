"""k-fold cross-validation: ``trainer.cv_folds=k`` trains k models and reports their spread.

The pool is train+val of the config's own split (``engine.data.split_table``); the test split
stays held out, the same rows for every fold. The pool's rows are cut into k folds by
scikit-learn's ``StratifiedKFold(n_splits=k, shuffle=True, random_state=data.split_seed)``
(``KFold`` for regression), so fold membership depends on (``data.split_seed``, k) only and every
trial of a sweep sees the same folds. Fold i trains on the other folds, validates on fold i,
tests on the test split, standardised on its own training rows.

Each fold is an ordinary run in ``<run dir>/fold_<i>/`` (``.hydra/config.yaml``, ``fold.json``
with its row indices, checkpoints, metrics.json, data card, tb/, train.log), trained by the
entry point's own ``run`` (passed in: engine.train imports this module, not the other way round).
A fold with a metrics.json is done: a re-run skips it and resumes the interrupted fold from its
``checkpoints/last.pt`` (``trainer.resume=auto`` per fold; ``trainer.resume=never`` starts every
fold over). The run dir's metrics.json holds ``cv/<split>/<metric>_mean`` and ``_std`` (sample
std, numpy ddof=1) of every val and test metric and each fold's values (``cv/fold_<i>/...``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from engine.config import ConfigError, validate
from engine.data import DataError, Table, split_table
from engine.runlog import also_log_to
from engine.task import Task, resolve_monitor
from engine.tb import TBLogger, flatten

log = logging.getLogger("engine")

FOLD_FILE = "fold.json"
_SPLITS = ("val/", "test/")


# --------------------------------------------------------------------------------------------
# names


def fold_dir(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / f"fold_{index}"


def fold_metric(cv_metric: str) -> str:
    """The fold metric a cv metric summarises: ``cv/val/acc_mean`` -> ``val/acc``."""
    name = cv_metric.removeprefix("cv/")
    for suffix in ("_mean", "_std"):
        if name.endswith(suffix) and name != cv_metric:
            return name.removesuffix(suffix)
    raise ConfigError(
        f"search.metric={cv_metric} is not a cross-validation metric; with trainer.cv_folds set "
        f"a trial's metrics are cv/<split>/<metric>_mean and _std, e.g. cv/val/acc_mean."
    )


def sweep_metric(metric: str, monitor: str, task: Task) -> str:
    """A sweep's objective under cross-validation: ``auto`` is the mean over folds of what the
    folds monitor (``cv/val/acc_mean`` for classification); any other must be a cv metric."""
    if metric == "auto":
        return f"cv/{resolve_monitor(monitor, 'auto', task)[0]}_mean"
    fold_metric(metric)  # refuses a name that is not a cv metric
    return metric


def tags(task: Task) -> list[str]:
    """The cv metrics of a task, the HPARAMS dashboard's metric columns."""
    return [f"cv/{tag}{stat}" for tag in task.tags() for stat in ("_mean", "_std")]


# --------------------------------------------------------------------------------------------
# folds


def pool_rows(table: Table) -> np.ndarray:
    """train+val, the rows the folds are cut from, in row order."""
    return np.sort(np.concatenate([table.train, table.val]))


def check_classes(table: Table, pool: np.ndarray, k: int) -> None:
    """Every fold needs each class in its validation rows: refuse a class with fewer than k."""
    if table.info.task != "classification":
        return
    counts = np.bincount(table.y[pool], minlength=table.info.num_classes)
    names = table.info.class_names or [str(c) for c in range(len(counts))]
    for index, count in enumerate(counts):
        if count < k:
            fewer = f"trainer.cv_folds={count} or " if count >= 2 else ""
            raise DataError(
                f"trainer.cv_folds={k}: class {names[index]!r} has {count} rows in train+val, "
                f"fewer than the {k} folds that each need one; use {fewer}more rows of that "
                f"class."
            )


def fold_rows(table: Table, k: int, seed: int) -> list[np.ndarray]:
    """Each fold's validation rows (indices into the table, sorted): scikit-learn's
    StratifiedKFold (KFold for regression) over the pool, shuffled with ``seed``."""
    from sklearn.model_selection import KFold, StratifiedKFold

    pool = pool_rows(table)
    check_classes(table, pool, k)
    if len(pool) < k:
        raise DataError(
            f"trainer.cv_folds={k}: train+val has {len(pool)} rows, fewer than the folds; use "
            f"trainer.cv_folds<={len(pool)}."
        )
    stratified = table.info.task == "classification"
    splitter = (StratifiedKFold if stratified else KFold)(
        n_splits=k, shuffle=True, random_state=seed
    )
    labels = table.y[pool] if stratified else None
    return [np.sort(pool[val]) for _, val in splitter.split(np.zeros(len(pool)), labels)]


def fold_table(table: Table, val_rows: np.ndarray) -> Table:
    """Fold i as a split of the table: the other folds train, fold i validates, test is test."""
    train = np.setdiff1d(pool_rows(table), val_rows)
    return dataclasses.replace(table, train=train, val=val_rows)


def _fold_record(table: Table, index: int, k: int, seed: int) -> dict[str, Any]:
    return {
        "fold": index,
        "folds": k,
        "split_seed": seed,
        "stratified": table.info.task == "classification",
        "train": table.train.tolist(),
        "val": table.val.tolist(),
        "test": table.test.tolist(),
    }


# --------------------------------------------------------------------------------------------
# results


def summarize(folds: list[dict[str, float]]) -> dict[str, float]:
    """Mean and sample std (ddof=1) over folds of every val and test metric, and each fold's
    values; with one fold (a pruned trial's first) the std is NaN, as it is undefined."""
    names = sorted({k for fold in folds for k in fold if k.startswith(_SPLITS)})
    summary: dict[str, float] = {"cv/folds": float(len(folds))}
    for name in names:
        values = np.array([fold.get(name, np.nan) for fold in folds], dtype=np.float64)
        summary[f"cv/{name}_mean"] = float(values.mean())
        summary[f"cv/{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        for index, value in enumerate(values):
            summary[f"cv/fold_{index}/{name}"] = float(value)
    return summary


def format_table(summary: dict[str, float], k: int) -> str:
    """metric | mean | std | fold 0 .. fold k-1, one row per val and test metric."""
    names = sorted(n[3:-5] for n in summary if n.startswith("cv/") and n.endswith("_mean"))
    width = max([12, *(len(n) + 2 for n in names)])
    header = f"{'metric':<{width}}{'mean':>10}{'std':>10}"
    header += "".join(f"{f'fold {i}':>10}" for i in range(k))
    rows = [header]
    for name in names:
        cells = [summary[f"cv/{name}_mean"], summary[f"cv/{name}_std"]]
        cells += [summary.get(f"cv/fold_{i}/{name}", float("nan")) for i in range(k)]
        rows.append(f"{name:<{width}}" + "".join(f"{c:>10.4f}" for c in cells))
    return "\n".join(rows)


def write_tensorboard(
    run_dir: Path,
    cfg: DictConfig,
    summary: dict[str, float],
    k: int,
    task: Task,
    session: str | None,
) -> None:
    """The run dir's tb/: the cv scalars at step k, each fold's values as a curve over folds
    (``cv/fold/<metric>``, step = fold index), and, unless a sweep writes its own (``session``
    empty), an HPARAMS session with the cv metrics as its metric columns."""
    logger = TBLogger(run_dir / "tb")
    try:
        if session is not None:
            hparams = flatten(OmegaConf.to_container(cfg, resolve=True))
            hparams = {key: v for key, v in hparams.items() if not key.startswith("search")}
            logger.hparams_start(hparams, tags(task), group=session)
        stats = {n: v for n, v in summary.items() if n.endswith(("_mean", "_std"))}
        logger.scalars(stats, k)
        for index in range(k):
            prefix = f"cv/fold_{index}/"
            values = {n.replace(prefix, "cv/fold/"): v for n, v in summary.items() if prefix in n}
            logger.scalars(values, index)
        if session is not None:
            logger.hparams_end("success")
    finally:
        logger.close()


# --------------------------------------------------------------------------------------------
# the run


def _fold_log(directory: Path):
    """The fold's lines also go to its own train.log, in the format of the run's train.log."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    formatter = files[0].formatter if files and files[0].formatter else logging.Formatter()
    return also_log_to(directory / "train.log", formatter)


def _fold_config(cfg: DictConfig) -> DictConfig:
    """A fold is a plain run (no folds of its own) that resumes from its own last.pt."""
    fold = copy.deepcopy(cfg)
    with open_dict(fold):
        fold.trainer.cv_folds = 0
        fold.trainer.resume = "never" if cfg.trainer.resume == "never" else "auto"
    return fold


def _finished(directory: Path, record: dict[str, Any], fold_cfg: DictConfig) -> dict | None:
    """The metrics of a fold an earlier attempt finished with the same rows and config; None
    when it has none. A fold made with other rows or another config is refused: its checkpoints
    would be mixed with this run's."""
    saved = directory / FOLD_FILE
    if not saved.exists():
        return None
    config = directory / ".hydra" / "config.yaml"
    same_rows = json.loads(saved.read_text()) == record
    same_config = config.exists() and OmegaConf.load(config) == fold_cfg
    if not (same_rows and same_config):
        what = (
            "other rows (data or trainer.cv_folds changed)" if not same_rows else "another config"
        )
        raise ConfigError(
            f"trainer.cv_folds: {directory} was made with {what}; rerun with the same command, "
            f"or use another hydra.run.dir (or trainer.resume=never to start every fold over)."
        )
    metrics = directory / "metrics.json"
    return json.loads(metrics.read_text()) if metrics.exists() else None


def _prepare(directory: Path, record: dict[str, Any], fold_cfg: DictConfig) -> None:
    (directory / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(fold_cfg, directory / ".hydra" / "config.yaml")
    (directory / FOLD_FILE).write_text(json.dumps(record))
    (directory / "metrics.json").unlink(missing_ok=True)  # trainer.resume=never: start over


def run_folds(
    cfg: DictConfig,
    run_dir: Path,
    train: Callable[..., dict[str, float]],
    *,
    fold_callback: Callable[..., None] | None = None,
    hparams_group: str = "",
    hparams_session: bool = True,
) -> dict[str, float]:
    """Train (or skip, when done) every fold with ``train`` (engine.train.run), write the cv
    metrics; return them. ``fold_callback(index, fold metrics, summary so far, final=...)``
    after each fold: a sweep's reporter, which may stop the run there (engine.search.pruners)."""
    validate(cfg)  # before the table is built: data=text has no rows to fold
    k = int(cfg.trainer.cv_folds)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"trainer.cv_folds={k} does not run under torchrun (DDP): its folds train one after "
            f"another in one process; run it without torchrun, or set trainer.cv_folds=0."
        )
    table = split_table(cfg.data)
    seed = int(cfg.data.split_seed)
    folds = fold_rows(table, k, seed)
    fold_cfg = _fold_config(cfg)
    never = cfg.trainer.resume == "never"
    results: list[dict[str, float]] = []
    for index, val_rows in enumerate(folds):
        directory = fold_dir(run_dir, index)
        rows = fold_table(table, val_rows)
        record = _fold_record(rows, index, k, seed)
        done = None if never else _finished(directory, record, fold_cfg)
        if done is not None:
            log.info("cv fold %d/%d: finished before, skipped (%s)", index + 1, k, directory)
        else:
            _prepare(directory, record, fold_cfg)
            log.info("cv fold %d/%d: %s", index + 1, k, directory)
            with _fold_log(directory):
                done = train(
                    fold_cfg,
                    directory,
                    table=rows,
                    hparams_group=hparams_group,
                    hparams_session=hparams_session,
                )
        results.append(done)
        if fold_callback is not None:
            fold_callback(index, done, summarize(results), final=index == k - 1)
    summary = summarize(results)
    session = (hparams_group or "cv") if hparams_session else None
    write_tensorboard(run_dir, cfg, summary, k, Task.of(table.info), session)
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    log.info("cross-validation, %d folds (std: sample, ddof=1):\n%s", k, format_table(summary, k))
    log.info("run dir: %s", run_dir)
    return summary
