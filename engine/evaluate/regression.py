"""Regression metrics in the target's own units, and the error by target quantile."""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILE_BINS = 5


def _errors(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred - y
    sse = float((err**2).sum())
    tss = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    return {
        "rmse": float(np.sqrt(sse / len(y))) if len(y) else float("nan"),
        "mae": float(np.abs(err).mean()) if len(y) else float("nan"),
        "r2": 1.0 - sse / tss if tss > 0 else float("nan"),
    }


def metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """RMSE, MAE, R^2 and per target-quantile bin the rows, MAE and RMSE."""
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    edges = np.quantile(y, np.linspace(0, 1, QUANTILE_BINS + 1))
    slot = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, QUANTILE_BINS - 1)
    by_quantile = []
    for b in range(QUANTILE_BINS):
        member = slot == b
        e = _errors(pred[member], y[member]) if member.any() else {}
        by_quantile.append(
            {
                "range": [float(edges[b]), float(edges[b + 1])],
                "rows": int(member.sum()),
                "mae": e.get("mae", float("nan")),
                "rmse": e.get("rmse", float("nan")),
            }
        )
    return {"rows": int(len(y)), **_errors(pred, y), "by_target_quantile": by_quantile}


def scalars(m: dict[str, Any]) -> dict[str, float]:
    return {"rmse": m["rmse"], "mae": m["mae"], "r2": m["r2"]}
