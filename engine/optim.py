"""Optimizers and learning-rate schedules (stepped once per optimizer step)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.config import OPTIMIZERS, ConfigError, or_list


def build_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases and norm weights (1-D parameters): decaying them only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused implementations update every parameter in one kernel (CPU and CUDA): on a small
    # model the per-parameter Python loop of the default one is a fifth of the step.
    fused = all(
        p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in decay + no_decay
    )
    options = {"fused": True} if fused else {}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **options)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **options)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **options
        )
    raise ConfigError(f"optim.name='{cfg.name}' is unknown; choose {or_list(OPTIMIZERS)}.")


def warmup_steps(cfg: Any, total_steps: int) -> int:
    """Warm-up length in optimizer steps: ``sched.warmup_steps`` as given, else the fraction of
    ``total_steps`` capped at ``sched.warmup_max_steps``.

    A pure function of the config and the planned step count, so a resumed run rebuilds the same
    schedule. The cap exists because a fraction of a huge ``trainer.max_epochs`` (set as "until
    early stopping") would keep the lr near zero for the whole run.
    """
    if cfg.warmup_steps:
        return cfg.warmup_steps
    planned = int(cfg.warmup_fraction * total_steps)
    if not planned:  # also spares configs written before the cap existed a lookup of it
        return 0
    cap = cfg.warmup_max_steps
    return min(planned, cap) if cap else planned


def warmup_capped(cfg: Any, total_steps: int) -> bool:
    """Whether ``sched.warmup_max_steps`` shortened the warm-up the fraction asked for."""
    return not cfg.warmup_steps and warmup_steps(cfg, total_steps) < int(
        cfg.warmup_fraction * total_steps
    )


def describe_warmup(cfg: Any, total_steps: int) -> str:
    """How long the warm-up is and where that comes from, as one phrase for the log."""
    steps = warmup_steps(cfg, total_steps)
    if cfg.warmup_steps:
        return f"warm-up: {steps} steps (sched.warmup_steps)"
    share = f"{cfg.warmup_fraction * 100:g}% of {total_steps} planned steps"
    if warmup_capped(cfg, total_steps):
        share += f", capped by sched.warmup_max_steps={cfg.warmup_max_steps}"
    return f"warm-up: {steps} steps ({share})"


def lr_factor(cfg: Any, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps out of ``total_steps``."""
    warmup = warmup_steps(cfg, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.name == "cosine":
        span = max(1, total_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.gamma ** (epoch // cfg.step_size)
    return 1.0


class LRSchedule:
    """Sets every param group's lr to ``base_lr * lr_factor(step)`` after each optimizer step.

    What ``LambdaLR`` does, minus its per-step bookkeeping: with a constant factor (``sched=none``
    without warmup) a step is a counter increment, which matters on small models where an
    optimizer step takes tens of microseconds. The state is the step count and the base lrs.
    """

    def __init__(
        self, cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
    ):
        self.cfg = cfg
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.warmup_steps = warmup_steps(cfg, total_steps)
        self.constant = cfg.name == "none" and self.warmup_steps == 0
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        return lr_factor(self.cfg, step, self.total_steps, self.steps_per_epoch)

    def step(self) -> None:
        self.step_count += 1
        if not self.constant:
            self._apply()

    def unstep(self) -> None:
        """Take back the last ``step``: the trainer counted an optimizer step that the device then
        skipped (engine/step_guard.py), and a skipped step does not advance the schedule."""
        self.step_count -= 1
        if not self.constant:
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.base_lrs = [float(lr) for lr in state["base_lrs"]]
        self._apply()


def build_scheduler(
    cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> LRSchedule:
    return LRSchedule(cfg, optimizer, total_steps, steps_per_epoch)
