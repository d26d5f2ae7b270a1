"""Models: linear, mlp, cnn (8x8 images), transformer (causal LM).

Every model is ``head(body(x))`` with ``head`` an ``nn.Linear``: the loss can then take the last
hidden state and the head weight straight into the fused linear cross-entropy, never holding the
full [N, C] logits (see engine/losses.py). ``forward`` still returns logits, for evaluation.
Regression models have one output and return predictions of shape [N].
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from engine.config import MODELS, ConfigError, or_list
from engine.dataset import DataInfo
from engine.head import HeadModel

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _mlp_body(in_features: int, widths: list[int], cfg: Any) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    width = in_features
    for hidden in widths:
        layers.append(nn.Linear(width, hidden))
        if cfg.norm == "batch":
            layers.append(nn.BatchNorm1d(hidden))
        elif cfg.norm == "layer":
            layers.append(nn.LayerNorm(hidden))
        layers.append(_ACTIVATIONS[cfg.activation]())
        if cfg.dropout > 0:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    return nn.Sequential(*layers), width


class ConvBody(nn.Module):
    """Conv blocks (3x3 conv, batch norm, activation) with a 2x2 pool between blocks, then a
    global average pool and a hidden layer. Sized for small images such as the 8x8 digits."""

    def __init__(self, input_shape: tuple[int, ...], cfg: Any):
        super().__init__()
        self.input_shape = tuple(input_shape)
        channels_in = input_shape[0]
        blocks: list[nn.Module] = []
        size = min(input_shape[1:])
        for i, channels in enumerate(cfg.channels):
            blocks += [
                nn.Conv2d(channels_in, channels, 3, padding=1),
                nn.BatchNorm2d(channels),
                _ACTIVATIONS[cfg.activation](),
            ]
            if i < len(cfg.channels) - 1 and size >= 4:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            channels_in = channels
        self.features = nn.Sequential(*blocks)
        self.proj = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels_in, cfg.hidden),
            _ACTIVATIONS[cfg.activation](),
            nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], *self.input_shape)  # rows of pixels -> [N, C, H, W]
        x = self.features(x).mean(dim=(2, 3), keepdim=True)
        return self.proj(x)


def build_model(cfg: Any, info: DataInfo) -> nn.Module:
    """Build the model named by ``model.name`` for the data described by ``info``."""
    regression = info.task == "regression"
    outputs = 1 if regression else info.num_classes
    if cfg.name == "transformer":
        from engine.transformer import build_transformer

        return build_transformer(cfg, info)
    if info.task == "lm":
        raise ConfigError(
            f"model={cfg.name} cannot train data=text (a language model): use model=transformer."
        )
    if cfg.name == "linear":
        return HeadModel(nn.Identity(), nn.Linear(info.num_features, outputs), regression)
    if cfg.name == "mlp":
        widths = list(cfg.hidden_sizes) if cfg.hidden_sizes else [cfg.hidden] * cfg.depth
        body, width = _mlp_body(info.num_features, widths, cfg)
        return HeadModel(body, nn.Linear(width, outputs), regression)
    if cfg.name == "cnn":
        if info.input_shape is None:
            raise ConfigError(
                "model=cnn needs image-shaped data (data=digits gives 1x8x8 images); this data "
                "has plain feature columns: use model=mlp or model=linear."
            )
        return HeadModel(
            ConvBody(info.input_shape, cfg), nn.Linear(cfg.hidden, outputs), regression
        )
    raise ConfigError(f"model.name='{cfg.name}' is unknown; choose {or_list(MODELS)}.")


def _shape_keys(cfg: Any) -> str:
    keys = ["hidden", "depth"] + ["hidden_sizes"] * bool(cfg.hidden_sizes)
    keys += ["channels"] * (cfg.name == "cnn")
    values = {k: getattr(cfg, k) for k in keys}
    return ", ".join(f"model.{k}={v if isinstance(v, int) else list(v)}" for k, v in values.items())


def check_model_fits(cfg: Any, info: DataInfo, device: torch.device) -> None:
    """Refuse a model that cannot be allocated on ``device``, before allocating any of it.

    It is built on the meta device first (shapes without storage, no time or memory): a size that
    overflows is an impossible shape, and the fp32 weights and their gradients, a lower bound of
    what training holds, must fit in the memory ``device`` has free."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, info)
    except (RuntimeError, OverflowError) as err:  # "Storage size calculation overflowed ..."
        raise ConfigError(
            f"{_shape_keys(cfg)}: no machine can hold this model ({err}); lower model.hidden or "
            f"model.depth."
        ) from err
    params = sum(p.numel() for p in model.parameters())
    needed = params * 4 * 2
    free = available_memory(device)
    if free is not None and needed > free:
        raise ConfigError(
            f"{_shape_keys(cfg)}: the model has {params:,} parameters, whose fp32 weights and "
            f"gradients alone take {needed / 2**30:,.1f} GiB, more than the {free / 2**30:,.1f} "
            f"GiB free on {device}; lower model.hidden or model.depth."
        )


def available_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CPU: RAM and swap, within a cgroup limit), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo").read().splitlines())
        free = (int(info["MemAvailable"].split()[0]) + int(info["SwapFree"].split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    try:  # a container's own limit (cgroup v2) can be far below the machine's memory
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free
