"""The training objective: which loss, and whether it runs through our fused kernels.

``loss=cross_entropy`` calls ``kernels.cross_entropy`` (Triton on CUDA, PyTorch on CPU) when
``loss.fused`` is true, ``torch.nn.functional.cross_entropy`` otherwise. A model whose config sets
``model.fused_head`` (the transformer does by default) never materialises its logits in training:
its forward hands the last hidden state and the head weight to ``kernels.linear_cross_entropy``.
That call happens inside the model's forward so DDP sees the head weight used in the graph.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.data import DataInfo

_TASK_LOSSES = {
    "classification": ("cross_entropy",),
    "lm": ("cross_entropy",),
    "regression": ("mse", "huber"),
}


def resolve_loss_name(cfg: Any, info: DataInfo) -> str:
    """``auto`` follows the data's task; an explicit loss must fit the task."""
    allowed = _TASK_LOSSES[info.task]
    if cfg.name == "auto":
        return allowed[0]
    if cfg.name not in allowed:
        kind = "a regression" if info.task == "regression" else "a classification"
        raise ConfigError(
            f"loss={cfg.name} does not fit this data, which is {kind} task: use "
            f"{' or '.join('loss=' + a for a in allowed)} (or loss=auto)."
        )
    return cfg.name


class Objective:
    """``objective(model, x, y)`` -> scalar training loss."""

    def __init__(self, cfg: Any, info: DataInfo, fused_head: bool = False):
        self.name = resolve_loss_name(cfg, info)
        self.cfg = cfg
        self.fused_head = fused_head and self.name == "cross_entropy"
        ce_options = dict(label_smoothing=cfg.label_smoothing)
        if self.name == "cross_entropy" and cfg.fused:
            # Every target of our data is a real class (labels are mapped to [0, C), tokens to
            # vocabulary ids), so no row is ever ignored: the kernels skip that guard.
            ce_options["ignore_index"] = None
            import kernels

            self.logits_loss = functools.partial(
                kernels.cross_entropy, z_loss=cfg.z_loss, **ce_options
            )
            self.head_loss = functools.partial(
                _fused_head_loss, kernels.linear_cross_entropy, z_loss=cfg.z_loss, **ce_options
            )
        elif self.name == "cross_entropy":
            if cfg.z_loss:
                raise ConfigError(
                    "loss.z_loss needs the fused kernels: set loss.fused=true or loss.z_loss=0."
                )
            self.logits_loss = functools.partial(_torch_cross_entropy, **ce_options)
            self.head_loss = functools.partial(_unfused_head_loss, **ce_options)
        elif self.name == "mse":
            self.logits_loss = F.mse_loss
        else:
            self.logits_loss = functools.partial(F.huber_loss, delta=cfg.huber_delta)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.fused_head:
            return model(x, target=y, head_loss=self.head_loss)
        out = model(x)
        if self.name != "cross_entropy":
            out = out.float()  # regression losses in fp32 even under autocast
        return self.logits_loss(out, y)


def _torch_cross_entropy(logits: torch.Tensor, target: torch.Tensor, **options) -> torch.Tensor:
    # torch wants classes at dim 1; our convention (and the kernels') puts them last.
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), **options
    )


def _fused_head_loss(fn, hidden, weight, bias, target, **options) -> torch.Tensor:
    return fn(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias, **options)


def _unfused_head_loss(hidden, weight, bias, target, **options) -> torch.Tensor:
    return _torch_cross_entropy(F.linear(hidden, weight, bias), target, **options)
