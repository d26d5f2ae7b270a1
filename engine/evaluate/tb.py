"""The evaluation as a TensorBoard run: scalars, the figures, and PR curves through
TensorBoard's own PR-curve plugin (one per class; the positive class of a binary task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.tensorboard import SummaryWriter


def write(
    folder: Path,
    scalars: dict[str, float],
    images: dict[str, np.ndarray],
    probs: np.ndarray | None,
    y: np.ndarray | None,
    class_names: list[str],
) -> None:
    writer = SummaryWriter(str(folder))
    try:
        for name, value in scalars.items():
            if np.isfinite(value):
                writer.add_scalar(f"eval/{name}", value, 0)
        for name, img in images.items():
            writer.add_image(f"eval/{name}", img, 0, dataformats="HWC")
        if probs is not None and y is not None:
            classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
            for c in classes:
                writer.add_pr_curve(f"pr_curve/{class_names[c]}", y == c, probs[:, c], 0)
    finally:
        writer.close()


def summary(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items())
