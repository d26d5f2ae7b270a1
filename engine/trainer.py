"""The training loop: precision, accumulation, clipping, evaluation, early stopping, NaN guard,
checkpoints and exact resume.

Reading order: ``Trainer`` attributes, ``fit`` (epochs), ``train_epoch`` (batches),
``optimizer_step`` (the guarded step), ``evaluate``, then ``state_dict``/``load_state_dict``.

Exact resume rests on three facts: the data order of an epoch is a function of (seed, epoch)
alone (engine/data.py), every RNG is saved with the counters, and checkpoints are only taken on
optimizer-step boundaries (no half-accumulated gradients to lose).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine import checkpoint as ckpt
from engine import distributed as dist
from engine import preempt
from engine.config import ConfigError
from engine.data import BatchLoader, DataInfo
from engine.faults import Faults
from engine.optim import LRSchedule, describe_warmup, warmup_capped
from engine.step_guard import StepGuard, Verdict
from engine.task import Task, resolve_monitor

log = logging.getLogger(__name__)

# Logits elements a fused-head model materialises at once in evaluation (16M floats = 64 MB).
EVAL_LOGITS_BUDGET = 1 << 24


class NonFiniteError(RuntimeError):
    """The loss or the gradients stopped being finite; the message names the step."""


class StopRun(Exception):
    """Raised by an ``epoch_callback`` to end a run early without it being a failure (a sweep's
    pruner does). ``hparams_status`` is how TensorBoard's HPARAMS then shows the run: its API
    knows success, failure and unknown, not "stopped early"."""

    hparams_status = "unknown"


class Preempted(StopRun):
    """The run was asked to stop from outside (``engine.preempt``: a cluster's warning signal):
    a checkpoint of the step it reached is on disk, and resuming from it continues the run as
    if it had never stopped."""

    def __init__(self, reason: str, step: int, checkpoint: Path):
        super().__init__(f"stopped at step {step} on {reason}; checkpoint {checkpoint}")
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


@dataclass
class FitState:
    """Counters saved with every checkpoint."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of epoch ``epoch`` already consumed (mid-epoch checkpoint)
    global_step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the monitored metric last improved
    nan_skips: int = 0
    epoch_loss_sum: float = 0.0  # running sums of the interrupted epoch, for its mean loss
    epoch_loss_count: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """``auto|cpu|cuda|cuda:N`` as a device; ``key`` is the setting an error names."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={name} but no CUDA GPU is visible to torch; use {key}=cpu or {key}=auto."
            )
        index = int(name.split(":")[1]) if ":" in name else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key}={name} but only {torch.cuda.device_count()} GPU(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})."
            )
        return torch.device("cuda", index)
    return torch.device("cpu")


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 autocast on GPUs that support it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(
            "trainer.precision=fp16 needs a CUDA device (its grad scaler is CUDA-only); on CPU use "
            "trainer.precision=fp32 or bf16."
        )
    return name


class Trainer:
    """Fits ``model`` on ``train_loader``, evaluating on ``val_loader`` after every epoch."""

    def __init__(
        self,
        cfg: Any,
        *,
        model: nn.Module,
        objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: LRSchedule,
        train_loader: BatchLoader,
        val_loader: BatchLoader | None,
        make_metrics: Callable[[], Any],
        info: DataInfo,
        device: torch.device,
        precision: str,
        run_dir: Path,
        logger: Any,
        rank: int = 0,
        world_size: int = 1,
        epoch_callback: Callable[..., None] | None = None,
        config_fingerprint: dict[str, Any] | None = None,
        faults: Faults | None = None,
    ):
        self.cfg = cfg
        self.model = model  # possibly wrapped (DDP, torch.compile)
        self.raw_model = _unwrap(model)
        self.objective = objective
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.make_metrics = make_metrics
        self.info = info
        self.device = device
        self.precision = precision
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.logger = logger
        self.rank = rank
        self.world_size = world_size
        self.is_main = rank == 0
        self.epoch_callback = epoch_callback
        self.config_fingerprint = config_fingerprint or {}
        self.state = FitState()
        self.task = Task.of(info)
        self.monitor, self.monitor_mode = resolve_monitor(cfg.monitor, cfg.monitor_mode, self.task)
        self.params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.progress = _progress_mode(cfg.progress)
        self.stop_reason = ""
        self.faults = faults  # the reliability tests' injected failures; None in a normal run
        self.checkpointer = ckpt.AsyncCheckpointer(faults)
        # Gradients are identical on every rank after DDP's all-reduce, so the gradient norm
        # gives every rank the same verdict; fp16's scaler treats inf gradients as routine.
        self.guard = StepGuard(
            optimizer,
            device,
            mode=cfg.nan_check,
            check_loss=world_size == 1,
            check_grads=self.scaler is None,
            scaler=self.scaler,
        )
        self.last_loss: float | None = None  # the latest step's loss the host has read
        # One metrics object, reset per evaluation; it keeps the last evaluation's state.
        self.eval_metrics: Any = None

    # ----------------------------------------------------------------------------------------
    # epochs

    def fit(self) -> dict[str, float]:
        """Train to ``max_epochs`` (or an early stop); return the best epoch's val metrics."""
        try:
            return self._fit()
        finally:
            self.checkpointer.close()  # every checkpoint is on disk before fit returns or raises

    def _fit(self) -> dict[str, float]:
        start = time.perf_counter()
        note = self._warmup_note()
        if note:
            log.info("%s", note)
        for epoch in range(self.state.epoch, self.cfg.max_epochs):
            self.train_loader.set_epoch(epoch)
            epoch_start = time.perf_counter()
            train_loss, samples = self.train_epoch(epoch)
            seconds = time.perf_counter() - epoch_start
            metrics = {"train/loss": train_loss}
            if self.val_loader is not None:
                metrics.update(self.evaluate(self.val_loader, "val"))
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            metrics["throughput/samples_per_s"] = samples * self.world_size / max(seconds, 1e-9)
            self._end_epoch(epoch, metrics)
            self._log_epoch(epoch, metrics, seconds)
            if self.epoch_callback is not None:
                # final: no epoch follows (the last one, or an early stop), so a sweep's pruner
                # must not stop the run there and lose its test metrics.
                final = epoch + 1 >= self.cfg.max_epochs or bool(self.stop_reason)
                self.epoch_callback(epoch, metrics, final=final)
            if self.stop_reason:
                break
            if epoch + 1 < self.cfg.max_epochs:  # after the callback: its report is not lost
                self._stop_if_requested()  # _end_epoch's checkpoint is the one to resume
        log.info("training took %.1f s", time.perf_counter() - start)
        return dict(self.state.best_metrics or self.state.last_metrics)

    def _end_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Update best/early-stop state, then checkpoint (last, and best on improvement)."""
        s = self.state
        s.epoch = epoch + 1
        s.batch_in_epoch = 0
        s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
        s.last_metrics = metrics
        value = metrics.get(self.monitor)
        if value is None and self.val_loader is not None:
            raise ConfigError(
                f"trainer.monitor={self.monitor} is not among this run's metrics "
                f"({', '.join(sorted(metrics))}); pick one of them."
            )
        improved = (
            value is None
            or s.best_value is None
            or (value > s.best_value if self.monitor_mode == "max" else value < s.best_value)
        )
        if improved:
            s.best_value, s.best_epoch, s.bad_epochs = value, epoch, 0
            s.best_metrics = dict(metrics)
        elif s.global_step >= self.scheduler.warmup_steps:
            # An epoch that ends inside the warm-up ran below the peak lr: its lack of progress
            # says nothing about convergence, so it does not use up the patience.
            s.bad_epochs += 1
            if self.cfg.early_stop_patience and s.bad_epochs >= self.cfg.early_stop_patience:
                self.stop_reason = (
                    f"early stop: {self.monitor} has not improved for {s.bad_epochs} epochs "
                    f"(best {s.best_value:.4g} at epoch {s.best_epoch + 1})"
                )
        self.save_checkpoint(best=improved)

    def _warmup_note(self) -> str:
        """The warm-up decision, when it is worth a log line: the cap shortened it, or early
        stopping waits for it (an epoch ends inside it)."""
        sched = self.scheduler
        capped = warmup_capped(sched.cfg, sched.total_steps)
        waits = bool(self.cfg.early_stop_patience) and sched.warmup_steps > sched.steps_per_epoch
        if not (capped or waits):
            return ""
        note = describe_warmup(sched.cfg, sched.total_steps)
        return note + ("; early stopping counts epochs after the warm-up" if waits else "")

    # ----------------------------------------------------------------------------------------
    # batches

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training batches, from where an interrupted epoch stopped."""
        s = self.state
        model, loader = self.model, self.train_loader
        if not model.training:  # evaluate() hands it back in training mode
            model.train()
        accumulate = self.cfg.accumulate_grad_batches
        n_batches = len(loader)
        first = s.batch_in_epoch
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        samples = 0
        bar = self._bar(epoch, n_batches, first)
        autocast = self._autocast()
        faults = self.faults
        for b, (x, y) in enumerate(loader.iter_from(first), start=first):
            if x.device != self.device:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast:
                loss = self.objective(model, x, y)
            if faults is not None and faults.nan_now(s.global_step + 1):
                loss = loss * float("nan")
            scaled = loss / accumulate if accumulate > 1 else loss
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum.add_(loss.detach(), alpha=x.shape[0])
            samples += x.shape[0]
            if (b + 1) % accumulate == 0 or b + 1 == n_batches:
                if faults is not None:
                    faults.before_step(s.global_step + 1)
                self.optimizer_step(loss, epoch, b)
                s.batch_in_epoch = b + 1
                if bar is not None:
                    bar.update(b + 1 - bar.n)
                    if self.last_loss is not None:  # the latest step the host has read
                        bar.set_postfix(loss=f"{self.last_loss:.4f}", refresh=False)
                n = self.cfg.ckpt_every_n_steps
                if n and s.global_step % n == 0 and b + 1 < n_batches:
                    self.settle()  # the counters a checkpoint saves are final ones
                    if s.global_step % n == 0:
                        self._save_mid_epoch(loss_sum, samples)
                if b + 1 < n_batches and preempt.requested() and self.world_size == 1:
                    self.settle()
                    self._save_mid_epoch(loss_sum, samples)
                    self._stop_if_requested()
        self.settle()  # the epoch's last step, before its loss, evaluation and checkpoint
        if bar is not None:
            bar.close()
        total = float(loss_sum) + s.epoch_loss_sum
        count = samples + s.epoch_loss_count
        s.samples_seen += samples
        return total / max(count, 1), samples

    def optimizer_step(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        """Unscale, clip, check finiteness on every rank alike, then step (or skip, or stop).

        The check must decide before ``optimizer.step`` or a NaN is already in the weights. The
        deferred guard (engine/step_guard.py) lets the device decide and reads the verdict a step
        later, in :meth:`settle`; the immediate one reads it here, before stepping.
        """
        s = self.state
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = None
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        deferred = self.guard.defers_now()
        values = self.guard.measure(loss, self.params, norm)
        # The previous step's verdict: read after this step's work is queued, acted on before
        # this step's update (a stop leaves the weights as the last good step left them).
        self.settle()
        where = (s.global_step + 1, epoch, batch)
        if not deferred:
            verdict = self.guard.read(values, *where)
            if verdict.bad:
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:  # ends the scaler's step: its next unscale_ needs it
                    self.scaler.update()
                self._non_finite(verdict)
                return
        self.guard.step(values if deferred else None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        s.global_step += 1
        if deferred:
            self.guard.stage(values, *where)
        else:
            self._stepped(verdict)

    def settle(self) -> None:
        """Act on the deferred verdict of the last step, if one is waiting: log its loss, or,
        when the device skipped it, take back the step the host counted and skip or stop."""
        verdict = self.guard.take()
        if verdict is None:
            return
        if verdict.bad:
            self.state.global_step -= 1
            self.scheduler.unstep()
            self._non_finite(verdict)
            return
        self._stepped(verdict)

    def _stepped(self, verdict: Verdict) -> None:
        self.last_loss = verdict.loss
        if self.is_main and verdict.step % self.cfg.log_every_n_steps == 0:
            self.logger.scalars({"train/loss": verdict.loss}, verdict.step)

    def _non_finite(self, verdict: Verdict) -> None:
        """A step that was not taken: count it as skipped, or raise ``NonFiniteError``."""
        s = self.state
        what = "loss" if verdict.loss_bad else "gradient norm"
        if self.cfg.on_nan == "skip" and s.nan_skips < self.cfg.max_nan_skips:
            s.nan_skips += 1
            log.warning(
                "non-finite %s at %s: step skipped (%d so far)", what, verdict.where, s.nan_skips
            )
            return
        self.checkpointer.wait()
        last = self.ckpt_dir / "last.pt"
        good = (
            f"the last good checkpoint is {last}"
            if last.exists()
            else "no checkpoint was written yet"
        )
        skipped = f" after {s.nan_skips} skipped steps" if s.nan_skips else ""
        value = verdict.loss if verdict.loss_bad else verdict.norm
        raise NonFiniteError(
            f"non-finite {what} ({value}) at {verdict.where}{skipped}; the optimizer did not "
            f"step, {good}. Lower optim.lr, set trainer.grad_clip, or use trainer.on_nan=skip."
        )

    # ----------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def evaluate(self, loader: BatchLoader, prefix: str) -> dict[str, float]:
        """Loss and metrics over a whole split (summed over ranks under DDP)."""
        model = self.model
        was_training = model.training
        model.eval()
        if self.eval_metrics is None:
            self.eval_metrics = self.make_metrics()
        metrics = self.eval_metrics
        metrics.reset()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        rows = 0
        eval_loss = self.objective.logits_loss
        task = self.task
        regression = task.kind == "regression"
        with self._autocast():
            for x, y in loader:
                if x.device != self.device:
                    x, y = (
                        x.to(self.device, non_blocking=True),
                        y.to(self.device, non_blocking=True),
                    )
                for out, target in self._eval_outputs(model, x, y):
                    out = out.float() if regression else out
                    loss_sum.add_(eval_loss(out, target), alpha=target.numel())
                    rows += target.numel()
                    if regression:  # metrics in the target's own units
                        metrics.update(task.in_target_units(out), task.in_target_units(target))
                    else:
                        metrics.update(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        if dist.is_initialized():  # sum and row count of every rank
            total = dist.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_tensor(rows)]))
            loss_value, rows = total.tolist()
        else:
            loss_value = loss_sum.item()
        results = {f"{prefix}/loss": loss_value / max(rows, 1)}
        results.update({f"{prefix}/{k}": v for k, v in metrics.compute().items()})
        results.update(task.derived(prefix, results))
        model.train(was_training)
        return results

    def _eval_outputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(outputs, targets) of a batch. A fused-head model yields its logits a few thousand
        rows at a time, so evaluation never holds [rows, vocab] logits either."""
        if not self.objective.fused_head:
            yield model(x), y
            return
        raw = self.raw_model
        hidden = raw.body(x)
        hidden, target = hidden.reshape(-1, hidden.shape[-1]), y.reshape(-1)
        rows = max(1, EVAL_LOGITS_BUDGET // raw.head.out_features)
        for start in range(0, hidden.shape[0], rows):
            yield raw.head(hidden[start : start + rows]), target[start : start + rows]

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "fit": _snapshot(self.state),
            "world_size": self.world_size,
            "config": self.config_fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any], source: Path) -> None:
        # Every entry is checked before any is loaded: a refused checkpoint leaves the trainer as
        # it was, and the user gets the entry's name instead of a KeyError from deep inside.
        problem = self._state_problem(state)
        if problem is None:
            self._check_compatible(state, source)
            mismatch = _weights_mismatch(self.raw_model.state_dict(), state["model"])
            if mismatch:
                raise ckpt.CheckpointError(
                    f"checkpoint {source} does not fit this model: {mismatch}. It was written by a "
                    f"run with another model config; use trainer.resume=never or another run dir."
                )
            problem = self._optimizer_problem(state["optimizer"])
        if problem is not None:
            raise ckpt.CheckpointError(
                f"checkpoint {source} cannot be resumed: {problem}. It is damaged or was not "
                f"written by this engine; delete it or pass another with trainer.resume=<path>, "
                f"or start over with trainer.resume=never."
            )
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.state = FitState(**state["fit"])

    def _check_compatible(self, state: dict[str, Any], source: Path) -> None:
        if state.get("world_size", 1) != self.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint {source} was written with world size {state.get('world_size')}, this "
                f"run has {self.world_size}: the data order would differ. Resume with the same "
                f"number of processes, or start over with trainer.resume=never."
            )
        saved = state.get("config", {})
        changed = [
            f"{k}: {saved[k]!r} -> {v!r}"
            for k, v in self.config_fingerprint.items()
            if k in saved and saved[k] != v
        ]
        if changed:
            restart = ""
            if any(c.startswith(("optim.", "sched.")) for c in changed):
                # The optimizer's and the schedule's state come back from the checkpoint, so a
                # resume cannot honour new values of theirs: a new run from the weights can.
                path_setting = self.cfg.resume not in ("auto", "never")
                restart = (
                    f" To train its weights with the new optimizer or schedule values, start a "
                    f"new run from them: trainer.init_from={source} with a new hydra.run.dir"
                    + (" and without trainer.resume=<path>" if path_setting else "")
                    + " (the weights only: a fresh optimizer, schedule and counters)."
                )
            raise ckpt.CheckpointError(
                f"checkpoint {source} was written by a run whose config differs in what resuming "
                f"depends on ({'; '.join(changed)}). Restore those values, or start over with "
                f"trainer.resume=never (or another hydra.run.dir).{restart}"
            )

    def resume_from(self, path: Path) -> None:
        self.load_state_dict(ckpt.load(path), path)
        log.info(
            "resumed from %s at epoch %d, batch %d, step %d",
            path,
            self.state.epoch + 1,
            self.state.batch_in_epoch,
            self.state.global_step,
        )

    def init_weights_from(self, setting: str) -> None:
        """``trainer.init_from``: the model weights of a checkpoint (a run dir: its best.pt, else
        last.pt) and nothing else, so the optimizer, schedule and counters start fresh and
        ``optim``/``sched`` values may differ from the run that wrote it."""
        path, weights = ckpt.load_model_weights(setting)
        mismatch = _weights_mismatch(self.raw_model.state_dict(), weights)
        if mismatch:
            raise ckpt.CheckpointError(
                f"checkpoint {path} (trainer.init_from) does not fit this model: {mismatch}. Use "
                f"the model config of the run that wrote it, or another checkpoint."
            )
        self.raw_model.load_state_dict(weights)
        log.info(
            "initialised the model weights from %s (trainer.init_from; the optimizer, schedule "
            "and counters start fresh)",
            path,
        )

    def _state_problem(self, state: dict[str, Any]) -> str | None:
        """What makes ``state`` unusable as a trainer state (the entry and why), or None."""
        kinds = {
            "model": (dict, "a dict"),
            "optimizer": (dict, "a dict"),
            "scheduler": (dict, "a dict"),
            "scaler": ((dict, type(None)), "a dict or null"),
            "rng": (dict, "a dict"),
            "fit": (dict, "a dict"),
            "world_size": (int, "an integer"),
            "config": (dict, "a dict"),
        }
        for key, (kind, wanted) in kinds.items():
            if key not in state:
                return f"entry '{key}' is missing"
            if not isinstance(state[key], kind) or isinstance(state[key], bool):
                return f"entry '{key}' is {_describe(state[key])}, not {wanted}"
        for name, value in state["model"].items():
            if not (isinstance(name, str) and isinstance(value, torch.Tensor)):
                return f"entry 'model.{name}' is {_describe(value)}, not a tensor"
        scaler = state["scaler"]
        return (
            _fit_problem(state["fit"])
            or _layout_problem(state["scheduler"], self.scheduler.state_dict(), "scheduler")
            or (
                _layout_problem(scaler, self.scaler.state_dict(), "scaler")
                if self.scaler is not None and scaler is not None
                else None
            )
            or ckpt.rng_state_problem(state["rng"])
        )

    def _optimizer_problem(self, saved: dict[str, Any]) -> str | None:
        """Whether ``saved`` is a state of this optimizer: its groups, their parameters, and
        per-parameter tensors of their parameter's shape (torch checks only the counts)."""
        groups, saved_groups = self.optimizer.param_groups, saved.get("param_groups")
        if not isinstance(saved.get("state"), dict) or not isinstance(saved_groups, list):
            return "entry 'optimizer' has no 'state' dict and 'param_groups' list"
        if len(saved_groups) != len(groups):
            return (
                f"entry 'optimizer.param_groups' has {len(saved_groups)} groups, this "
                f"optimizer {len(groups)}"
            )
        params: dict[int, torch.Tensor] = {}
        for i, (saved_group, group) in enumerate(zip(saved_groups, groups, strict=True)):
            ids = saved_group.get("params") if isinstance(saved_group, dict) else None
            if not (
                isinstance(ids, list)
                and len(ids) == len(group["params"])
                and all(type(j) is int for j in ids)
            ):
                return (
                    f"entry 'optimizer.param_groups.{i}' does not list this group's "
                    f"{len(group['params'])} parameters"
                )
            lr = saved_group.get("lr")
            if not isinstance(lr, int | float) or isinstance(lr, bool):
                return f"entry 'optimizer.param_groups.{i}.lr' is {_describe(lr)}, not a number"
            params.update(zip(ids, group["params"], strict=True))
        for j, per_param in saved["state"].items():
            if j not in params or not isinstance(per_param, dict):
                return f"entry 'optimizer.state.{j}' belongs to no parameter of this optimizer"
            shape = params[j].shape
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor) and value.ndim and value.shape != shape:
                    return (
                        f"entry 'optimizer.state.{j}.{name}' has shape {list(value.shape)}, its "
                        f"parameter {list(shape)}"
                    )
        return None

    def save_checkpoint(self, best: bool = False) -> None:
        if not (self.is_main and self.cfg.save_checkpoints):
            return
        # Everything logged up to this step reaches the event file before the checkpoint says so;
        # a resume then purges only what came after, leaving no gap in the curves.
        self.logger.flush()
        best_path = self.ckpt_dir / "best.pt" if best else None
        self.checkpointer.save(self.state_dict(), self.ckpt_dir / "last.pt", best_path)

    def _stop_if_requested(self) -> None:
        """Raise ``Preempted`` once the latest checkpoint is on disk, if a stop was asked for.

        One process only: under DDP every rank would have to agree on the step (a collective
        per step); a preempted DDP run resumes from its last periodic or epoch checkpoint."""
        reason = preempt.requested()
        if reason is None or self.world_size > 1:
            return
        self.checkpointer.wait()
        step = self.state.global_step
        log.warning("%s: stopping at step %d with a checkpoint, to resume there", reason, step)
        raise Preempted(reason, step, self.ckpt_dir / "last.pt")

    def _save_mid_epoch(self, loss_sum: torch.Tensor, samples: int) -> None:
        s = self.state
        saved = (s.epoch_loss_sum, s.epoch_loss_count)
        s.epoch_loss_sum, s.epoch_loss_count = saved[0] + float(loss_sum), saved[1] + samples
        try:
            self.save_checkpoint()
        finally:
            s.epoch_loss_sum, s.epoch_loss_count = saved

    # ----------------------------------------------------------------------------------------
    # helpers

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _bar(self, epoch: int, total: int, initial: int):
        if self.progress != "bar" or not self.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch + 1}/{self.cfg.max_epochs}",
            leave=False,
            dynamic_ncols=True,
            mininterval=0.2,
        )

    def _log_epoch(self, epoch: int, metrics: dict[str, float], seconds: float) -> None:
        if not self.is_main:
            return
        # The epoch's mean training loss gets its own tag: train/loss holds the per-step values.
        scalars = {("train/loss_epoch" if k == "train/loss" else k): v for k, v in metrics.items()}
        self.logger.scalars(scalars | {"epoch": epoch + 1}, self.state.global_step)
        if self.progress == "none":
            return
        parts = [f"{k} {metrics[k]:.4f}" for k in self.task.console_columns() if k in metrics]
        log.info(
            "epoch %d/%d  %s  %.0f samples/s  %.2fs%s",
            epoch + 1,
            self.cfg.max_epochs,
            "  ".join(parts),
            metrics["throughput/samples_per_s"],
            seconds,
            "  *" if self.state.best_epoch == epoch else "",
        )


def _snapshot(state: FitState) -> dict[str, Any]:
    """The counters as a dict that later updates cannot change (the metric dicts are flat, so a
    shallow copy of each is enough; ``dataclasses.asdict`` would deep-copy every float)."""
    return {k: dict(v) if isinstance(v, dict) else v for k, v in vars(state).items()}


def _progress_mode(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() else "epoch"


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)


def _describe(value: Any) -> str:
    text = repr(value)
    return f"the {type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _weights_mismatch(expected: dict[str, torch.Tensor], given: dict[str, Any]) -> str:
    """The first tensor in which ``given`` differs from ``expected``, with shapes ("" if none)."""
    for name, tensor in expected.items():
        if name not in given:
            return f"it has no {name} (shape {list(tensor.shape)} in this model)"
        if given[name].shape != tensor.shape:
            return (
                f"{name} has shape {list(given[name].shape)} there, {list(tensor.shape)} in this "
                f"model"
            )
    extra = next((name for name in given if name not in expected), None)
    return f"it has {extra}, which this model lacks" if extra is not None else ""


def _fit_problem(fit: dict[str, Any]) -> str | None:
    """Whether ``fit`` holds every ``FitState`` counter, each of its field's kind."""
    fields = {f.name: f for f in dataclasses.fields(FitState)}
    unknown = next((k for k in fit if k not in fields), None)
    if unknown is not None:
        return f"entry 'fit.{unknown}' is not a counter of this engine"
    for name, f in fields.items():
        if name not in fit:
            return f"entry 'fit.{name}' is missing"
        value = fit[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(default, dict):
            ok = isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
                for k, v in value.items()
            )
            kind = "a dict of metric values"
        elif isinstance(default, int):
            ok = type(value) is int and value >= min(default, 0)  # best_epoch starts at -1
            kind = f"an integer >= {min(default, 0)}"
        else:
            ok = number or (default is None and value is None)
            kind = "a number" + (" or null" if default is None else "")
        if not ok:
            return f"entry 'fit.{name}' is {_describe(value)}, not {kind}"
    return None


def _layout_problem(saved: Any, current: Any, entry: str) -> str | None:
    """Whether ``saved`` has the layout of ``current``, a state this run produces itself: the
    same keys, list lengths and kinds of value (an int counts as a float)."""
    if isinstance(current, dict):
        if not isinstance(saved, dict):
            return f"entry '{entry}' is {_describe(saved)}, not a dict"
        for key, value in current.items():
            if key not in saved:
                return f"entry '{entry}.{key}' is missing"
            problem = _layout_problem(saved[key], value, f"{entry}.{key}")
            if problem:
                return problem
        return None
    if isinstance(current, list | tuple):
        if not isinstance(saved, list | tuple) or len(saved) != len(current):
            return f"entry '{entry}' is {_describe(saved)}, not a list of {len(current)} values"
        for i, (a, b) in enumerate(zip(saved, current, strict=True)):
            problem = _layout_problem(a, b, f"{entry}.{i}")
            if problem:
                return problem
        return None
    if isinstance(current, bool):
        kinds: tuple[type, ...] = (bool,)
    elif isinstance(current, int | float):
        kinds = (int,) if isinstance(current, int) else (int, float)
        if isinstance(saved, bool):
            kinds = ()
    elif current is None:
        return None
    else:
        kinds = (type(current),)
    if not isinstance(saved, kinds):
        return f"entry '{entry}' is {_describe(saved)}, not of the kind {type(current).__name__}"
    return None
