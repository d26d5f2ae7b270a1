"""Classification metrics of one set of outputs, computed directly from the probabilities and
targets (tests hold them to torchmetrics' and scikit-learn's definitions)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.task import TOP_K

ECE_BINS = 15


def _div(num: Any, den: Any) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[C, C] counts, row = target, column = prediction."""
    return np.bincount(y * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def calibration_bins(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Per bin (15 equal-width bins over [0, 1], plus one for confidence exactly 1.0, as
    torchmetrics bins them): rows, correct rows and the confidence sum."""
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    slot = np.searchsorted(edges, confidence, side="right") - 1
    slot = np.clip(slot, 0, ECE_BINS)
    count = np.bincount(slot, minlength=ECE_BINS + 1).astype(np.float64)
    hits = np.bincount(slot, weights=correct.astype(np.float64), minlength=ECE_BINS + 1)
    conf_sum = np.bincount(slot, weights=confidence.astype(np.float64), minlength=ECE_BINS + 1)
    return {"count": count, "correct": hits, "conf_sum": conf_sum, "edges": edges}


def ece(bins: dict[str, np.ndarray]) -> float:
    """Expected calibration error, L1: the row-weighted mean |accuracy - confidence| per bin."""
    count = bins["count"]
    gap = np.abs(_div(bins["correct"], count) - _div(bins["conf_sum"], count))
    return float((gap * count).sum() / max(count.sum(), 1.0))


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve: the chance a positive row outscores a negative one (ties
    count half), from the average ranks of the scores."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # Tied scores share the mean of the ranks they span.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    mean_rank = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def pr_points(score: np.ndarray, positive: np.ndarray) -> dict[str, np.ndarray]:
    """Precision and recall at each distinct score taken as the threshold (predict positive at
    score >= threshold), highest threshold first."""
    order = np.argsort(-score, kind="mergesort")
    s, p = score[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tp = np.cumsum(p)[last]
    fp = (last + 1) - tp
    return {
        "threshold": s[last],
        "precision": _div(tp, tp + fp),
        "recall": _div(tp, max(p.sum(), 1.0)),
    }


def average_precision(points: dict[str, np.ndarray]) -> float:
    """PR-AUC as average precision: sum over thresholds of (recall step) x precision."""
    recall = np.r_[0.0, points["recall"]]
    return float((np.diff(recall) * points["precision"]).sum())


def best_f1_threshold(points: dict[str, np.ndarray]) -> dict[str, float]:
    p, r = points["precision"], points["recall"]
    f1 = _div(2 * p * r, p + r)
    i = int(np.argmax(f1))
    return {
        "threshold": float(points["threshold"][i]),
        "f1": float(f1[i]),
        "precision": float(p[i]),
        "recall": float(r[i]),
    }


def metrics(logits: torch.Tensor, y: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Every classification number of the report, from logits [N, C] and class indices [N]."""
    probs = torch.softmax(logits.double(), dim=-1).numpy()
    c = probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion(y, pred, c)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    precision, recall = _div(tp, predicted), _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    weights = _div(support, support.sum())
    confidence = probs.max(axis=1)
    bins = calibration_bins(confidence, pred == y)
    out: dict[str, Any] = {
        "rows": int(len(y)),
        "accuracy": float(_div(tp.sum(), len(y))),
        "per_class": [
            {
                "class": class_names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(c)
        ],
        "macro": {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        },
        "weighted": {
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
        },
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalised": _div(cm, support[:, None]).tolist(),
        "ece": ece(bins),
        "calibration": {k: v.tolist() for k, v in bins.items()},
        "confidence_histogram": np.histogram(confidence, bins=ECE_BINS, range=(0, 1))[0].tolist(),
    }
    if c > TOP_K:
        top = np.argsort(-probs, axis=1)[:, :TOP_K]
        out[f"top{TOP_K}"] = float((top == y[:, None]).any(axis=1).mean())
    if c == 2:
        positive = y == 1
        points = pr_points(probs[:, 1], positive)
        out["binary"] = {
            "positive_class": class_names[1],
            "roc_auc": roc_auc(probs[:, 1], positive),
            "pr_auc": average_precision(points),
            "best_f1": best_f1_threshold(points),
        }
    return out


def scalars(m: dict[str, Any]) -> dict[str, float]:
    """The headline numbers, flat: for TensorBoard, the slices' gaps and the console."""
    flat = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro"]["f1"],
        "macro_precision": m["macro"]["precision"],
        "macro_recall": m["macro"]["recall"],
        "weighted_f1": m["weighted"]["f1"],
        "ece": m["ece"],
    }
    if f"top{TOP_K}" in m:
        flat[f"top{TOP_K}"] = m[f"top{TOP_K}"]
    if "binary" in m:
        flat["roc_auc"] = m["binary"]["roc_auc"]
        flat["pr_auc"] = m["binary"]["pr_auc"]
    return flat
