"""Typed schema of the training config.

Hydra composes ``conf/train.yaml`` on top of ``TrainConfig`` (registered in the ConfigStore as
``train_schema``), so a misspelt key (``trainer.max_epocs``) or a mistyped value
(``trainer.max_epochs=ten``) fails at composition time, before any compute, with a message that
names the key. Checks that need more than a type (ranges, incompatible options) live in
:func:`validate`, which the entry point calls before it builds anything.

Each group (``data``, ``model``, ...) has one dataclass holding the union of the options of every
choice in the group: the choice's YAML file sets ``name`` and the keys it uses. That keeps keys
typed and checked without one schema per YAML file. Next to each dataclass stand the values its
choice keys allow (``MODELS``, ``SAMPLERS``, ...: the one list the building code dispatches on and
names in its messages) and ``validate_<group>``, the group's own checks.

This module is imported by every command-line start: it must not import torch or optuna.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A config value that type checking could not catch; the message names the key."""


def or_list(names: tuple[str, ...]) -> str:
    """``linear, mlp, cnn or transformer``: the choices as a message names them."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else ", ".join(names)


def _check_choices(group: str, node: Any, **allowed: tuple[str, ...]) -> None:
    for key, choices in allowed.items():
        value = getattr(node, key)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), choices, n=1)
            closest = f" Did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(
                f"{group}.{key}={value!r} is not allowed; choose one of {', '.join(choices)}."
                f"{closest}"
            )


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {requirement}.")


def _check_seed(key: str, value: int) -> None:
    # numpy's legacy seeding (np.random.seed, Optuna's samplers) takes 32-bit unsigned seeds only,
    # and says so without naming the key.
    _check(0 <= value < 2**32, key, value, "a seed must be in [0, 2**32 - 1]")


# --------------------------------------------------------------------------------------------
# data

DATASETS = ("digits", "breast_cancer", "wine", "diabetes", "csv", "synthetic", "text")
DATA_TASKS = ("auto", "classification", "regression")


@dataclass
class DataConfig:
    name: str = MISSING
    """Dataset: digits | breast_cancer | wine | diabetes | csv | synthetic (| text)."""
    batch_size: int = 64
    """Training batch size (per process under DDP)."""
    eval_batch_size: int = 1024
    """Batch size for validation and test passes."""
    val_fraction: float = 0.15
    """Share of the rows held out for validation (seeded split)."""
    test_fraction: float = 0.15
    """Share of the rows held out for test (seeded split)."""
    split_seed: int = 0
    """Seed of the train/val/test split, independent of the training seed so runs compare."""
    standardize: bool = True
    """Standardise features with the mean/std of the training split only."""
    path: str | None = None
    """csv: path of a .csv or .parquet file (relative paths resolve from the launch folder)."""
    target: str | None = None
    """csv: name of the target column."""
    features: list[str] | None = None
    """csv: feature columns; null means every column but the target."""
    task: str = "auto"
    """csv: classification | regression | auto (integer or string targets with few values classify)."""
    n_samples: int = 10000
    """synthetic: number of rows."""
    n_features: int = 32
    """synthetic: number of features."""
    n_classes: int = 10
    """synthetic: number of classes (0 means a regression target)."""
    noise: float = 0.1
    """synthetic: label noise (fraction of flipped labels) or target noise (regression)."""
    seed: int = 0
    """synthetic: seed of the generator."""
    on_device: bool = True
    """Keep a small in-memory dataset on the training device and slice batches there."""
    # text (language modelling) options, used by data=text
    vocab_size: int = 8192
    """text: size of the vocabulary learnt from the corpus."""
    seq_len: int = 64
    """text: tokens per training sequence."""
    max_tokens: int = 400000
    """text: cap on the number of corpus tokens used."""


def validate_data(d: Any) -> None:
    _check_choices("data", d, name=DATASETS, task=DATA_TASKS)
    _check(d.batch_size > 0, "data.batch_size", d.batch_size, "it must be a positive integer")
    _check(d.eval_batch_size > 0, "data.eval_batch_size", d.eval_batch_size, "it must be positive")
    _check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", d.val_fraction, "it must be in [0, 1)")
    _check(
        0.0 < d.test_fraction < 1.0, "data.test_fraction", d.test_fraction, "it must be in (0, 1)"
    )
    _check(
        d.val_fraction + d.test_fraction < 0.9,
        "data.val_fraction",
        d.val_fraction,
        f"val_fraction + test_fraction must leave at least 10% for training (test_fraction={d.test_fraction})",
    )
    _check_seed("data.seed", d.seed)
    _check_seed("data.split_seed", d.split_seed)
    if d.name == "csv":
        _check(
            bool(d.path), "data.path", d.path, "data=csv needs data.path=<file.csv|file.parquet>"
        )
    if d.name == "synthetic":
        _check(d.n_samples >= 10, "data.n_samples", d.n_samples, "use at least 10 rows")
        _check(d.n_features > 0, "data.n_features", d.n_features, "it must be positive")
        _check(
            d.n_classes >= 0 and d.n_classes != 1,
            "data.n_classes",
            d.n_classes,
            "use 0 (regression) or >= 2",
        )


# --------------------------------------------------------------------------------------------
# model

MODELS = ("linear", "mlp", "cnn", "transformer")
NORMS = ("none", "batch", "layer")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class ModelConfig:
    name: str = MISSING
    """Model: linear | mlp | cnn | transformer."""
    hidden: int = 128
    """mlp: width of each hidden layer; transformer: model width."""
    depth: int = 2
    """mlp: number of hidden layers; transformer: number of blocks."""
    hidden_sizes: list[int] | None = None
    """mlp: explicit hidden widths (overrides hidden and depth)."""
    dropout: float = 0.0
    """Dropout probability after each hidden layer."""
    norm: str = "none"
    """mlp: none | batch | layer normalisation after each hidden layer."""
    activation: str = "gelu"
    """relu | gelu | silu | tanh."""
    channels: list[int] = field(default_factory=lambda: [32, 64])
    """cnn: output channels of each conv block."""
    heads: int = 4
    """transformer: attention heads."""
    fused_head: bool = False
    """Hand the last hidden state and head weight to the fused linear cross-entropy."""


def validate_model(m: Any) -> None:
    _check_choices("model", m, name=MODELS, norm=NORMS, activation=ACTIVATIONS)
    _check(m.hidden > 0, "model.hidden", m.hidden, "it must be a positive integer")
    _check(m.depth >= 0, "model.depth", m.depth, "it must be >= 0")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", m.dropout, "it must be in [0, 1)")


# --------------------------------------------------------------------------------------------
# loss

LOSSES = ("auto", "cross_entropy", "mse", "huber")


@dataclass
class LossConfig:
    name: str = "auto"
    """auto (cross_entropy for classification, mse for regression) | cross_entropy | mse | huber."""
    label_smoothing: float = 0.0
    """cross_entropy: label smoothing in [0, 1)."""
    z_loss: float = 0.0
    """cross_entropy: weight of the logsumexp**2 penalty."""
    huber_delta: float = 1.0
    """huber: threshold between the quadratic and linear parts."""
    fused: bool = True
    """Use the fused kernels (Triton on CUDA, chunked PyTorch on CPU) instead of torch's."""


def validate_loss(loss: Any) -> None:
    _check_choices("loss", loss, name=LOSSES)
    ls = loss.label_smoothing
    _check(0.0 <= ls < 1.0, "loss.label_smoothing", ls, "it must be in [0, 1)")
    _check(loss.z_loss >= 0, "loss.z_loss", loss.z_loss, "it must be >= 0")
    _check(loss.huber_delta > 0, "loss.huber_delta", loss.huber_delta, "it must be positive")


# --------------------------------------------------------------------------------------------
# optim

OPTIMIZERS = ("adamw", "adam", "sgd")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw | adam | sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.01
    """Decoupled weight decay (adamw) or L2 penalty (adam, sgd)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adam/adamw: (beta1, beta2)."""
    momentum: float = 0.9
    """sgd: momentum."""
    nesterov: bool = False
    """sgd: Nesterov momentum."""


def validate_optim(o: Any) -> None:
    _check_choices("optim", o, name=OPTIMIZERS)
    _check(o.lr > 0, "optim.lr", o.lr, "the learning rate must be positive")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "it must be >= 0")
    _check(len(o.betas) == 2, "optim.betas", list(o.betas), "give two values, e.g. [0.9, 0.999]")


# --------------------------------------------------------------------------------------------
# sched

SCHEDULES = ("cosine", "step", "none")


@dataclass
class SchedConfig:
    name: str = "cosine"
    """cosine | step | none (constant)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 to the peak lr over this many optimizer steps."""
    warmup_fraction: float = 0.0
    """Warm-up as a fraction of all optimizer steps (used when warmup_steps is 0)."""
    # 1000 = 1 / (1 - beta2) for Adam(W)'s default beta2=0.999: the horizon over which its
    # second-moment estimate settles, which is what a warm-up is for (Ma & Yarats, 2019, argue
    # for about 2 / (1 - beta2)). A run of ordinary length (5% of a few thousand steps) stays
    # under it; only "until early stopping" runs with a huge max_epochs reach it.
    warmup_max_steps: int = 1000
    """Cap in optimizer steps on the warm-up given by warmup_fraction (not on an explicit
    warmup_steps); 0: no cap."""
    min_lr_ratio: float = 0.0
    """cosine: final lr as a fraction of the peak."""
    step_size: int = 10
    """step: epochs between decays."""
    gamma: float = 0.1
    """step: multiplicative decay."""


def validate_sched(s: Any) -> None:
    _check_choices("sched", s, name=SCHEDULES)
    _check(s.warmup_steps >= 0, "sched.warmup_steps", s.warmup_steps, "it must be >= 0")
    _check(
        0.0 <= s.warmup_fraction < 1.0,
        "sched.warmup_fraction",
        s.warmup_fraction,
        "it must be in [0, 1)",
    )
    _check(
        s.warmup_max_steps >= 0,
        "sched.warmup_max_steps",
        s.warmup_max_steps,
        "it must be >= 0 (0: no cap)",
    )
    _check(s.step_size > 0, "sched.step_size", s.step_size, "it must be a positive integer")


# --------------------------------------------------------------------------------------------
# trainer

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MONITOR_MODES = ("auto", "max", "min")
PROGRESS_MODES = ("auto", "bar", "epoch", "none")
NAN_POLICIES = ("stop", "skip")
NAN_CHECKS = ("auto", "deferred", "immediate")


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    """Number of passes over the training split."""
    device: str = "auto"
    """auto (CUDA if present, else CPU) | cpu | cuda | cuda:N."""
    precision: str = "auto"
    """auto (bf16 autocast on GPUs that support it, fp32 on CPU) | fp32 | bf16 | fp16."""
    seed: int = 0
    """Seed of python, numpy and torch RNGs (and of the data order)."""
    accumulate_grad_batches: int = 1
    """Optimizer step every N batches."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    monitor: str = "auto"
    """Metric for best checkpoint and early stopping; auto: val/acc (classification), val/rmse (regression)."""
    monitor_mode: str = "auto"
    """max | min | auto (from the metric's name)."""
    early_stop_patience: int = 0
    """Stop after this many epochs without improvement of the monitored metric; 0 disables."""
    resume: str = "auto"
    """auto (continue from <run dir>/checkpoints/last.pt when present) | never | <path to a checkpoint>."""
    init_from: str | None = None
    """A checkpoint, or a run dir (its checkpoints/best.pt, else last.pt), whose model weights the
    run starts from, with a fresh optimizer, schedule and counters: how to train on with other
    optim or sched values. A checkpoint that trainer.resume finds is resumed instead."""
    ckpt_every_n_steps: int = 0
    """Also write last.pt every N optimizer steps inside an epoch; 0: at epoch ends only."""
    save_checkpoints: bool = True
    """Write checkpoints/last.pt and checkpoints/best.pt."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    log_every_n_steps: int = 10
    """TensorBoard step-scalar interval."""
    progress: str = "auto"
    """auto (a bar on a terminal, one line per epoch otherwise) | bar | epoch | none."""
    on_nan: str = "stop"
    """stop | skip: what to do when the loss or gradients are not finite."""
    max_nan_skips: int = 10
    """skip: stop after this many skipped steps."""
    nan_check: str = "auto"
    """When the host reads a step's finiteness: deferred (the device skips a non-finite update
    itself and the host learns of it one step later, so it never waits for the GPU between log
    steps) | immediate (read before every optimizer step) | auto (deferred on CUDA, immediate on
    the CPU, where the read costs nothing). Optimizers other than the fused ones are immediate."""
    num_threads: int = 0
    """CPU threads for torch; 0 keeps torch's default."""
    cv_folds: int = 0
    """k-fold cross-validation (engine/cv.py): k >= 2 trains k models on stratified folds of
    train+val (the test split stays held out), each in ``<run dir>/fold_<i>/``, and reports
    ``cv/val/<metric>_mean`` and ``_std``; 0: off."""


def validate_trainer(t: Any) -> None:
    _check_choices(
        "trainer",
        t,
        precision=PRECISIONS,
        monitor_mode=MONITOR_MODES,
        progress=PROGRESS_MODES,
        on_nan=NAN_POLICIES,
        nan_check=NAN_CHECKS,
    )
    _check(t.max_epochs > 0, "trainer.max_epochs", t.max_epochs, "it must be a positive integer")
    _check(
        t.accumulate_grad_batches > 0,
        "trainer.accumulate_grad_batches",
        t.accumulate_grad_batches,
        "it must be a positive integer",
    )
    _check(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "use 0 to disable clipping")
    _check(
        t.early_stop_patience >= 0,
        "trainer.early_stop_patience",
        t.early_stop_patience,
        "use 0 to disable",
    )
    _check(
        t.ckpt_every_n_steps >= 0,
        "trainer.ckpt_every_n_steps",
        t.ckpt_every_n_steps,
        "use 0 to disable",
    )
    _check(
        t.log_every_n_steps > 0,
        "trainer.log_every_n_steps",
        t.log_every_n_steps,
        "it must be positive",
    )
    _check(t.max_nan_skips >= 0, "trainer.max_nan_skips", t.max_nan_skips, "it must be >= 0")
    _check(
        t.cv_folds == 0 or t.cv_folds >= 2,
        "trainer.cv_folds",
        t.cv_folds,
        "use 0 (no cross-validation) or a number of folds k >= 2",
    )
    _check_seed("trainer.seed", t.seed)
    check_device("trainer.device", t.device)


def check_device(key: str, value: str) -> None:
    """``auto | cpu | cuda | cuda:N``: the device settings of training, serving and prediction."""
    _check(
        value in ("auto", "cpu", "cuda") or value.startswith("cuda:"),
        key,
        value,
        "use auto, cpu, cuda or cuda:N",
    )
    if value.startswith("cuda:"):
        _check(value[5:].isdecimal(), key, value, "the GPU index must be a number, e.g. cuda:0")


# --------------------------------------------------------------------------------------------
# search

SAMPLERS = ("grid", "random", "tpe", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "hyperband", "wilcoxon")
DIRECTIONS = ("auto", "maximize", "minimize")
LAUNCH_MODES = ("auto", "processes", "launcher", "external")


@dataclass
class SearchConfig:
    """A hyperparameter sweep (``python -m engine.train -m search=<preset>``); see engine/search/."""

    sampler: str = "tpe"
    """grid | random | tpe | gp | cmaes | nsga2."""
    n_trials: int | None = 20
    """Total number of finished trials (complete, pruned or failed), also after a resume; null with
    grid: every combination."""
    n_workers: int | None = None
    """Worker processes running trials back to back; null: one per visible GPU (one per
    ``gpus_per_trial`` GPUs), else 1."""
    gpus_per_trial: int = 1
    """Processes per trial: above 1 each trial trains as that many DDP ranks (NCCL, one GPU each,
    the worker's own GPUs; gloo ranks on a machine without GPUs), as ``torchrun
    --nproc-per-node=<gpus_per_trial>`` would run it."""
    pruner: str = "none"
    """none | median | hyperband: stop unpromising trials early from their per-epoch metric;
    wilcoxon: from their per-fold metric (``trainer.cv_folds``), paired with the best trial's
    folds (Optuna's WilcoxonPruner)."""
    wilcoxon_p_threshold: float = 0.1
    """search.pruner=wilcoxon: prune when the signed-rank test's p-value that the trial is worse
    than the best one falls below this. After n folds the smallest p is 2**-n, so 0.1 can prune
    from the 4th fold on, 0.3 from the 2nd."""
    storage: str | None = None
    """Optuna storage URL (sqlite:///x.db, postgresql://user@host/db); null: a journal file
    ``study.journal`` in the sweep dir."""
    study_name: str | None = None
    """Name of the study in the storage; null: the sweep dir's folder name."""
    metric: str = "auto"
    """Objective, a key of metrics.json; auto: val/acc (classification), val/rmse (regression)."""
    direction: str = "auto"
    """maximize | minimize | auto (from the metric's name, as trainer.monitor_mode)."""
    metrics: list[str] | None = None
    """Several objectives (nsga2 or any multi-objective sampler), e.g. [val/acc, val/ece]."""
    directions: list[str] | None = None
    """One direction per entry of ``metrics`` (maximize | minimize | auto)."""
    seed: int = 0
    """Seed of the sampler (trial N samples with seed + N, so a resumed sweep does not repeat)."""
    max_failures: int = 10
    """Stop the sweep after this many trials in a row have failed in one run of the sweep."""
    params: dict[str, str] = field(default_factory=dict)
    """Search space: config key -> Hydra sweep grammar (``choice``, ``range``, ``interval``,
    ``tag(log, interval(a,b))``); merged with sweep overrides from the command line."""
    launch: str = "auto"
    """How workers start: processes (subprocesses here) | launcher (one job per worker through
    ``hydra/launcher``) | external (none: create the study, then wait for workers started
    elsewhere, ``python -m engine.search.worker``, and write the reports) | auto (launcher
    unless it is Hydra's basic one)."""
    worker: int | None = None
    """Internal: set on the jobs that run workers through a Hydra launcher."""
    worker_threads: int = 0
    """Internal: torch CPU threads of such a job (the sweep command shares the cores out)."""
    register: str | None = None
    """Register the best trial's run dir in the model registry under this model name when the
    sweep ends (``python -m engine.registry``; its database from ``ENGINE_REGISTRY_STORAGE``,
    default ``outputs/registry.db``); null: do not register."""


def validate_search(s: Any) -> None:
    """Checks of the ``search`` group alone (the space itself is checked by engine.search.space)."""
    _check_choices(
        "search", s, sampler=SAMPLERS, pruner=PRUNERS, direction=DIRECTIONS, launch=LAUNCH_MODES
    )
    if s.n_trials is not None:
        _check(s.n_trials > 0, "search.n_trials", s.n_trials, "it must be a positive integer")
    if s.n_workers is not None:
        _check(s.n_workers > 0, "search.n_workers", s.n_workers, "it must be a positive integer")
    _check(s.gpus_per_trial > 0, "search.gpus_per_trial", s.gpus_per_trial, "it must be at least 1")
    _check(s.max_failures > 0, "search.max_failures", s.max_failures, "it must be positive")
    _check(
        0 < s.wilcoxon_p_threshold <= 1,
        "search.wilcoxon_p_threshold",
        s.wilcoxon_p_threshold,
        "a p-value threshold is in (0, 1]",
    )
    _check_seed("search.seed", s.seed)
    _check(bool(s.metric), "search.metric", s.metric, "name a key of metrics.json, e.g. val/acc")
    if s.metrics is not None:
        _check_objectives(s)
    elif s.directions is not None:
        raise ConfigError(
            "search.directions is set but search.metrics is not; give both, or use "
            "search.metric and search.direction for one objective."
        )


def _check_objectives(s: Any) -> None:
    """Several objectives (``search.metrics``): one direction each, and no pruner."""
    metrics = list(s.metrics)
    _check(len(metrics) > 0, "search.metrics", metrics, "name at least one metric")
    directions = list(s.directions) if s.directions is not None else ["auto"] * len(metrics)
    _check(
        len(directions) == len(metrics),
        "search.directions",
        directions,
        f"give one direction per metric of search.metrics={metrics}",
    )
    for direction in directions:
        _check(
            direction in DIRECTIONS,
            "search.directions",
            directions,
            "each must be maximize, minimize or auto",
        )
    _check(
        len(metrics) == 1 or s.pruner == "none",
        "search.pruner",
        s.pruner,
        "pruning needs a single objective; use search.pruner=none with several search.metrics",
    )


# --------------------------------------------------------------------------------------------
# the whole config


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    search: SearchConfig | None = None
    """Sweep settings, set by ``-m search=<name>``; null for a single run."""


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def validate(cfg: Any) -> None:
    """Reject values that are well-typed but unusable, naming the key and the fix.

    Each group is checked on its own, in the order of ``TrainConfig``; the checks that span two
    groups come after the groups' (cross-validation's)."""
    check_schema(cfg)
    validate_data(cfg.data)
    validate_model(cfg.model)
    validate_loss(cfg.loss)
    validate_optim(cfg.optim)
    validate_sched(cfg.sched)
    validate_trainer(cfg.trainer)
    if cfg.get("search") is not None:
        validate_search(cfg.search)
    validate_cv(cfg)


def validate_cv(cfg: Any) -> None:
    """``trainer.cv_folds`` with what cross-validation cannot do: folds of a table's rows, one
    process per fold, steps that are folds."""
    k = cfg.trainer.cv_folds
    if k < 2:
        return
    _check(
        cfg.data.name != "text",
        "trainer.cv_folds",
        k,
        "data=text is one token stream, not rows to fold; use trainer.cv_folds=0 with data=text",
    )
    s = cfg.get("search")
    if s is None:
        return
    _check(
        s.gpus_per_trial == 1,
        "trainer.cv_folds",
        k,
        f"cross-validation trains its folds in one process, not as DDP ranks "
        f"(search.gpus_per_trial={s.gpus_per_trial}); use search.gpus_per_trial=1",
    )
    _check(
        s.pruner != "hyperband",
        "search.pruner",
        s.pruner,
        "with trainer.cv_folds a trial reports one step per fold, not per epoch; use "
        "search.pruner=wilcoxon (or median, none)",
    )


def _schema_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, type]:
    """Every dotted key of the schema (groups included), e.g. ``trainer.max_epochs``."""
    keys: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys[name] = f.type
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.update(_schema_keys(type(default), name + "."))
        elif name == "search":  # optional group: null until -m search=<preset>
            keys.update(_schema_keys(SearchConfig, name + "."))
    return keys


# Hydra's command-line options (``python -m engine.train --help``), short names mapped to long
# ones; argparse also accepts a unique prefix of a long one (``--config-n``).
_SHORT_OPTIONS = {
    "-h": "--help",
    "-c": "--cfg",
    "-p": "--package",
    "-r": "--run",
    "-m": "--multirun",
    "-sc": "--shell-completion",
    "-cp": "--config-path",
    "-cn": "--config-name",
    "-cd": "--config-dir",
    "-i": "--info",
}
_LONG_OPTIONS = (
    *_SHORT_OPTIONS.values(),
    "--hydra-help",
    "--version",
    "--resolve",
    "--experimental-rerun",
)
_OPTIONS_WITH_VALUE = (
    "--cfg",
    "--package",
    "--config-path",
    "--config-name",
    "--config-dir",
    "--experimental-rerun",
)
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")
_TYPED_GROUPS = ("data", "model", "loss", "optim", "sched", "trainer", "search")
# The primary config folder (conf/train.yaml and the groups), beside the engine package.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _option(word: str) -> str | None:
    name = word.split("=", 1)[0]
    if name in _SHORT_OPTIONS:
        return _SHORT_OPTIONS[name]
    matches = [o for o in _LONG_OPTIONS if o.startswith(name)] if name.startswith("--") else []
    return name if name in matches else matches[0] if len(matches) == 1 else None


def split_command_line(args: list[str]) -> tuple[set[str], list[str]]:
    """(Hydra's options by long name, the overrides) of a command line, as Hydra's argparse reads
    it: an option's value (``-cd <dir>``, ``--cfg job``, ``-i config``) is not an override."""
    options: set[str] = set()
    overrides: list[str] = []
    i = 0
    while i < len(args):
        word = args[i]
        i += 1
        if not word.startswith("-"):  # keys never start with "-"; negative values follow a "="
            overrides.append(word)
            continue
        name = _option(word)
        if name is None:
            continue  # argparse refuses it
        options.add(name)
        if "=" in word or i == len(args):
            continue
        if name in _OPTIONS_WITH_VALUE or (name == "--info" and args[i] in _INFO_CHOICES):
            i += 1
    return options, overrides


def unknown_key_message(key: str, where: str) -> str:
    """``key`` is not in the schema: name the closest valid key and the keys of its group."""
    keys = _schema_keys()
    hint = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    fix = f" Did you mean '{hint[0]}'?" if hint else ""
    section = key.split(".", 1)[0]
    known = sorted(
        k.split(".", 1)[1] for k in keys if k.startswith(section + ".") and k.count(".") == 1
    )
    listing = f" Valid keys of '{section}': {', '.join(known)}." if known else ""
    return f"unknown config key '{key}' ({where}).{fix}{listing}"


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _check_deletion(arg: str, keys: dict[str, type]) -> str | None:
    key = arg[1:].split("=", 1)[0]
    if "/" in key or "@" in key or key.startswith(("hydra", "search.params.")) or key == "search":
        return None
    if key in _TYPED_GROUPS:
        options = ", ".join(_group_options(key))
        return (
            f"{key}: the '{key}' group cannot be removed (in override '{arg}'), every run needs "
            f"one; choose another option instead: {key}=<{options.replace(', ', '|')}>."
        )
    if key in keys:
        return (
            f"{key}: a key of the typed config cannot be deleted (in override '{arg}'); set the "
            f"value you want instead, {key}=<value> (`--cfg job` shows the current values)."
        )
    if key.split(".", 1)[0] in _TYPED_GROUPS:
        return unknown_key_message(key, f"in override '{arg}'")
    return None


def check_override_keys(args: list[str]) -> str | None:
    """Return an error message for the first command-line override whose key does not exist.

    Hydra also rejects such a key, but suggests appending it with ``+``, which is the wrong fix
    for a typo; we name the closest valid key instead. ``+key``/``++key`` of a typed group are
    checked too (Hydra would add the typo and the run would ignore it), and so is ``~key`` (Hydra
    cannot delete a key of the typed config). Hydra's own keys (``hydra.*``), config groups
    (``group/x``), the free ``search.params`` dict and new top-level keys are left to Hydra.
    """
    options, overrides = split_command_line(args)
    if "--shell-completion" in options:
        return None  # its words (install=bash, query=bash) are commands, not overrides
    keys = _schema_keys()
    for arg in overrides:
        if arg.startswith("~"):
            problem = _check_deletion(arg, keys)
            if problem:
                return problem
            continue
        added = arg.startswith("+")
        key = arg.lstrip("+").split("=", 1)[0]
        if "=" not in arg or "/" in key or "@" in key:
            continue
        if key.startswith(("hydra", "search.params.")) or key in keys:
            continue
        if added and key.split(".", 1)[0] not in _TYPED_GROUPS:
            continue
        return unknown_key_message(key, f"in override '{arg}'")
    return None


def check_schema(cfg: Any) -> None:
    """Refuse a key that a typed group does not have, however it got in (``+key``, ``++key``, a
    YAML file from ``--config-dir``): OmegaConf lets such keys into a structured config, and the
    run would silently ignore them. Also refuse a required value left unset (``???``)."""
    from omegaconf import OmegaConf

    for group in dataclasses.fields(TrainConfig):
        node = getattr(cfg, group.name, None)
        if not OmegaConf.is_dict(node):
            continue
        schema = SearchConfig if group.name == "search" else group.default_factory
        fields = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key not in fields:
                where = "in the composed config: added with +, ++ or a config file"
                raise ConfigError(unknown_key_message(f"{group.name}.{key}", where))
        for key in fields:
            if OmegaConf.is_missing(node, key):
                options = "|".join(_group_options(group.name))
                fix = (
                    f"choose an option of the group, {group.name}=<{options}>"
                    if key == "name"
                    else f"set {group.name}.{key}=<value>"
                )
                raise ConfigError(f"{group.name}.{key} has no value (???): {fix}.")


def check_sweep_types(args: list[str]) -> str | None:
    """``-m key=interval(a,b)`` without ``search=``: Hydra's basic sweeper only takes lists and
    ranges and fails with a traceback; say which sweeper takes an interval."""
    options, overrides = split_command_line(args)
    if "--multirun" not in options or options & {"--config-name", "--config-path"}:
        return None  # another primary config may pick its own sweeper
    keys = [a.lstrip("+").split("=", 1)[0] for a in overrides]
    if any(k == "search" or k.startswith("hydra/sweeper") for k in keys):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            override = parser.parse_override(arg)
        except OverrideParseException:
            continue  # Hydra reports it
        if override.value_type == ValueType.INTERVAL_SWEEP:
            key = override.get_key_element()
            return (
                f"{key}: '{arg}' is an interval, which Hydra's basic sweeper (-m without search=) "
                f"cannot sample; sweep it with the engine's sweeper: python -m engine.train -m "
                f"search=tpe '{arg}' (or search=random, gp, cmaes), or give a list of values "
                f"({key}=a,b,c)."
            )
    return None


def check_output_dir(args: list[str]) -> str | None:
    """A ``hydra.run.dir`` (``hydra.sweep.dir`` with -m) that is a file or cannot be created:
    Hydra would fail with a traceback when it makes the folder."""
    options, overrides = split_command_line(args)
    shows = {"--help", "--hydra-help", "--version", "--cfg", "--info", "--shell-completion"}
    if options & shows:
        return None  # nothing is written
    key = "hydra.sweep.dir" if "--multirun" in options else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in overrides if a.lstrip("+").split("=", 1)[0] == key]
    if not given or not given[-1]:
        return None
    text = given[-1]
    # An interpolation (a timestamp) names a folder that does not exist yet: check where it goes.
    path = Path(text.split("${", 1)[0] + "x").parent if "${" in text else Path(text)
    path = path.expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={text}: {existing} is a file, not a folder; pass another {key}=<folder>."
    if not os.access(existing, os.W_OK | os.X_OK):
        made = "" if existing == path else f", so {path} cannot be created"
        return f"{key}={text}: {existing} is not writable{made}; pass another {key}=<folder>."
    return None


def check_command_line(args: list[str]) -> str | None:
    """The mistakes a command line shows before Hydra composes anything (about 2 s sooner than
    the first model would be built): the first one's message, or None."""
    return check_override_keys(args) or check_sweep_types(args) or check_output_dir(args)


def _first_line(text: Any) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def describe_config_error(err: BaseException) -> str:
    """Hydra's or OmegaConf's refusal of a config as ``<key>: <what>``, without Hydra's advice to
    append a misspelt key with ``+``; any other error as its message."""
    from hydra.errors import (
        HydraException,
        MissingConfigException,
        OverrideParseException,
        SearchPathException,
    )
    from omegaconf.errors import OmegaConfBaseException

    text = str(err)
    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return text
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        choices = sorted(err.options)
        hint = difflib.get_close_matches(option, choices, n=1)
        closest = f" Did you mean '{group}={hint[0]}'?" if hint else ""
        return (
            f"{group}={option}: the '{group}' group has no option '{option}'; available: "
            f"{', '.join(choices)}.{closest}"
        )
    if isinstance(err, OverrideParseException):
        return f"could not parse the override '{err.override}': {_first_line(err.message)}"
    if isinstance(err, SearchPathException):
        return f"--config-dir: {_first_line(text)}"
    # Hydra wraps OmegaConf's error, as the cause or (composing a file) only as the context.
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__ or err.__context__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        return _describe_key_error(cause, text)
    return _first_line(text)


def _describe_key_error(cause: Any, text: str) -> str:
    """OmegaConf's refusal of one key (``cause``), placed by Hydra's wrapping message ``text``."""
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key, what = cause.full_key, _first_line(getattr(cause, "msg", None) or cause)
    override = re.match(r"Error merging override (\S+)", text)
    source = re.match(r"In '([^']+)'", text)
    where = (
        f"in override '{override.group(1)}'"
        if override
        else f"in config '{source.group(1)}'"
        if source
        else "in the config"
    )
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and "not in" in what:
        return unknown_key_message(key, where)
    if "does not support deletion" in what:
        return (
            f"{key}: a key of the typed config cannot be deleted ({where}); set the value "
            f"you want instead, {key}=<value>."
        )
    return f"{key}: {what} ({where})."
