"""Slices and fairness: every metric per group of rows, the largest gap between groups, and
for classification the demographic-parity and equalized-odds differences (as fairlearn
defines them: max minus min across groups; multiclass one-vs-rest, the largest over classes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def feature_groups(values: np.ndarray, bins: int) -> np.ndarray:
    """A numeric feature cut into quantile bins, each labelled by its range."""
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)))
    slot = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max(len(edges) - 2, 0))
    labels = [
        f"[{edges[i]:.4g}, {edges[i + 1]:.4g}{']' if i == len(edges) - 2 else ')'}"
        for i in range(max(len(edges) - 1, 1))
    ]
    return np.array([labels[s] for s in slot], dtype=object)


def _rate_spread(rates: list[np.ndarray]) -> float:
    stacked = np.array(rates)  # [groups, classes]
    return float(np.nanmax(stacked.max(axis=0) - stacked.min(axis=0))) if len(rates) else 0.0


def fairness(
    y: np.ndarray, pred: np.ndarray, groups: list[np.ndarray], num_classes: int
) -> dict[str, float]:
    """Over the scored groups (row masks): selection rate, TPR and FPR per class one-vs-rest
    (binary: the positive class only); each difference is max - min across groups."""
    classes = [1] if num_classes == 2 else list(range(num_classes))
    selection, tpr, fpr = [], [], []
    for member in groups:
        yg, pg = y[member], pred[member]
        selection.append(np.array([(pg == c).mean() for c in classes]))
        tpr.append(
            np.array([(pg[yg == c] == c).mean() if (yg == c).any() else np.nan for c in classes])
        )
        fpr.append(
            np.array([(pg[yg != c] == c).mean() if (yg != c).any() else np.nan for c in classes])
        )
    return {
        "demographic_parity_difference": _rate_spread(selection),
        "equalized_odds_difference": max(_rate_spread(tpr), _rate_spread(fpr)),
    }


def slice_report(
    labels: np.ndarray,
    min_size: int,
    score: Callable[[np.ndarray], dict[str, float]],
    fair: Callable[[list[np.ndarray]], dict[str, float]] | None,
) -> dict[str, Any]:
    """Groups of ``labels`` scored by ``score(mask)``; those under ``min_size`` rows listed as
    too small with their size."""
    names = sorted({str(v) for v in labels.tolist()})
    text = np.array([str(v) for v in labels.tolist()], dtype=object)
    scored, too_small, masks = [], [], []
    for name in names:
        member = text == name
        size = int(member.sum())
        if size < min_size:
            too_small.append({"group": name, "rows": size})
            continue
        scored.append({"group": name, "rows": size, **score(member)})
        masks.append(member)
    metrics = [k for k in (scored[0] if scored else {}) if k not in ("group", "rows")]
    gaps = {}
    for m in metrics:
        values = [g[m] for g in scored if np.isfinite(g[m])]
        gaps[m] = float(max(values) - min(values)) if values else float("nan")
    out: dict[str, Any] = {
        "groups": scored,
        "too_small": too_small,
        "largest_gap": gaps,
        "min_group_size": min_size,
    }
    if fair is not None and len(masks) >= 1:
        out["fairness"] = fair(masks)
    return out
