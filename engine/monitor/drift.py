"""Drift of a model's inputs and predictions: a window of recent rows against the reference
(the model's training rows, stored at registration), one test per feature and one for the
predictions.

The alarm rule. Each feature is tested (numeric: Kolmogorov-Smirnov; categorical: chi-square,
see ``engine.monitor.stats``) and alarms when its p-value is below ``p_value / F`` for F
features (Bonferroni): when nothing drifts, the chance that any feature alarms in a report is
at most ``p_value`` (0.05 by default), whatever the features' dependence. The predictions are
tested on their own at ``p_value`` (class mix, or predicted values for regression), so a report
with no drift alarms at all with probability at most ``2 x p_value``. The rate is per report:
a server that recomputes the report every few seconds over a sliding window tests the same
rows again and again, so an isolated alarm is a reason to look, a persisting one is drift.

A feature is "categorical" when every reference value is an integer and it has at most
``max_categories`` distinct values (pixel intensities 0..16, codes, counts), "numeric"
otherwise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

import engine.monitor.stats as stats
from engine import preprocess
from engine.config import ConfigError

BATCH_ROWS = 4096  # rows per model call when predicting the reference sample


@dataclass
class FeatureReference:
    """What one feature's tests need of the reference."""

    name: str
    kind: str  # "numeric" | "categorical"
    values: np.ndarray  # numeric: the reference's values (sorted); categorical: the categories
    counts: np.ndarray  # categorical: rows per category (+ 0 for "never seen"); numeric: per bin
    edges: np.ndarray | None = None  # numeric: the PSI bins' inner edges (reference deciles)


@dataclass
class Reference:
    """A model's reference statistics: per feature, and of its predictions on its training
    rows (classification: the predicted-class mix and mean confidence; regression: the
    predicted values)."""

    feature_names: list[str]
    task: str  # "classification" | "regression"
    features: list[FeatureReference]
    predicted: np.ndarray  # [N] predicted class indices (int64) or values (target units)
    confidence: np.ndarray | None  # [N] classification: the top class's probability
    num_classes: int = 0
    predictor: Any = field(default=None, repr=False)

    @property
    def rows(self) -> int:
        return len(self.predicted)

    @classmethod
    def build(cls, sample: dict[str, Any], predictor: Any, max_categories: int = 20) -> Reference:
        """From ``engine.registry.reference.read()``'s sample and the model it belongs to: the
        model is run once over the sample's rows for the reference predictions."""
        task = predictor.info.task
        if task not in ("classification", "regression"):
            raise ConfigError(
                f"drift monitoring compares tables of features; a {task} model has none."
            )
        names = list(sample["features"])
        if names != predictor.feature_names:
            raise ConfigError(
                "the reference sample's features do not match the model's "
                f"({len(names)} vs {len(predictor.feature_names)} columns); register the "
                "model again so the sample is rebuilt from its training data."
            )
        x = np.asarray(sample["x"], dtype=np.float32)
        if len(x) == 0:
            raise ConfigError("the model's reference sample holds no rows.")
        features = [
            _feature_reference(name, x[:, j], max_categories) for j, name in enumerate(names)
        ]
        ref = cls(names, task, features, np.zeros(0), None, predictor=predictor)
        ref.num_classes = (
            len(predictor.info.class_names or []) or int(predictor.info.num_classes or 0)
            if task == "classification"
            else 0
        )
        ref.predicted, ref.confidence = ref.predict(x)
        return ref

    def predict(self, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The model's (predicted, confidence) for raw rows [N, F], as the server records
        them: class indices and top probabilities, or values in the target's units."""
        model = self.predictor
        predicted, confidence = [], []
        for start in range(0, len(x_raw), BATCH_ROWS):
            chunk = preprocess.standardize(x_raw[start : start + BATCH_ROWS], model.info)
            decoded = model.decode(model.outputs(torch.from_numpy(np.ascontiguousarray(chunk))))
            if self.task == "classification":
                predicted.append(decoded.class_index)
                confidence.append(decoded.confidence.astype(np.float64))
            else:
                predicted.append(np.asarray(decoded.outputs, dtype=np.float64).reshape(-1))
        if self.task == "classification":
            return np.concatenate(predicted), np.concatenate(confidence)
        return np.concatenate(predicted), None


def _feature_reference(name: str, values: np.ndarray, max_categories: int) -> FeatureReference:
    categories = np.unique(values)
    if np.all(values == np.round(values)) and len(categories) <= max_categories:
        return FeatureReference(
            name, "categorical", categories, _category_counts(values, categories)
        )
    edges = stats.quantile_edges(values)
    return FeatureReference(
        name,
        "numeric",
        np.sort(values.astype(np.float64)),
        stats.binned_counts(values, edges),
        edges,
    )


def _category_counts(values: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Rows per category, with a last column for values not among the categories."""
    slot = np.searchsorted(categories, values)
    known = (slot < len(categories)) & (categories[np.minimum(slot, len(categories) - 1)] == values)
    slot = np.where(known, slot, len(categories))
    return np.bincount(slot, minlength=len(categories) + 1)


@dataclass
class FeatureDrift:
    name: str
    kind: str  # "numeric" | "categorical"
    test: str  # "ks" | "chi2"
    statistic: float
    p_value: float
    psi: float
    alarm: bool
    exact: bool = False  # chi2: counts too few for the chi-square distribution, Fisher's p-value


@dataclass
class PredictionDrift:
    test: str  # classification: "chi2" on the predicted classes; regression: "ks"
    statistic: float
    p_value: float
    psi: float
    mean_confidence: float | None
    reference_mean_confidence: float | None
    alarm: bool


@dataclass
class DriftReport:
    rows: int  # predictions in the window
    enough: bool  # False: fewer than min_rows, no test was run
    p_value: float
    threshold: float  # a feature's alarm threshold: p_value / number of features (Bonferroni)
    min_rows: int
    features: list[FeatureDrift]
    prediction: PredictionDrift | None
    inputs: bool = True  # False: the window had no inputs (a log without them), predictions only

    @property
    def alarms(self) -> list[str]:
        """The features in alarm, and "prediction" when the predictions' test alarms."""
        names = [f.name for f in self.features if f.alarm]
        if self.prediction is not None and self.prediction.alarm:
            names.append("prediction")
        return names

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and infinities as null), the body of ``GET /v2/models/<name>/drift``."""
        body = asdict(self)
        body["alarms"] = self.alarms
        return _finite(body)


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def compare(
    ref: Reference,
    x: np.ndarray | None,
    predicted: np.ndarray,
    confidence: np.ndarray | None,
    p_value: float = 0.05,
    min_rows: int = 30,
) -> DriftReport:
    """The drift report of a window: raw features ``x`` [n, F] (None: no inputs; rows with a
    NaN, e.g. log lines without inputs, are left out of the feature tests), ``predicted`` [n]
    class indices or values, ``confidence`` [n] or None."""
    predicted = np.asarray(predicted)
    n_features = len(ref.features)
    threshold = p_value / max(n_features, 1)
    report = DriftReport(
        len(predicted), False, p_value, threshold, min_rows, [], None, x is not None
    )
    if len(predicted) < min_rows:
        return report
    report.enough = True
    if x is not None:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != n_features:
            raise ValueError(f"x has shape {x.shape}; the reference has {n_features} features")
        x = x[np.isfinite(x).all(axis=1)]
        if len(x) >= min_rows:
            report.features = [
                _feature_drift(f, x[:, j], threshold) for j, f in enumerate(ref.features)
            ]
    report.prediction = _prediction_drift(ref, predicted, confidence, p_value)
    return report


def _feature_drift(ref: FeatureReference, values: np.ndarray, threshold: float) -> FeatureDrift:
    if ref.kind == "categorical":
        counts = _category_counts(values, ref.values)
        result = stats.homogeneity(counts, ref.counts)
        psi = stats.psi(counts, ref.counts)
    else:
        result = stats.ks(values.astype(np.float64), ref.values)
        psi = stats.psi(stats.binned_counts(values, ref.edges), ref.counts)
    return FeatureDrift(
        ref.name, ref.kind, result.test, result.statistic, result.p_value, psi,
        bool(result.p_value < threshold), result.exact,
    )  # fmt: skip


def _prediction_drift(
    ref: Reference, predicted: np.ndarray, confidence: np.ndarray | None, p_value: float
) -> PredictionDrift:
    if ref.task == "classification":
        classes = max(ref.num_classes, int(ref.predicted.max()) + 1, int(predicted.max()) + 1)
        window_counts = np.bincount(predicted.astype(np.int64), minlength=classes)
        ref_counts = np.bincount(ref.predicted, minlength=classes)
        result = stats.homogeneity(window_counts, ref_counts)
        psi = stats.psi(window_counts, ref_counts)
        mean = None
        if confidence is not None and np.isfinite(confidence).any():
            mean = float(np.nanmean(np.asarray(confidence, dtype=np.float64)))
        ref_mean = float(ref.confidence.mean()) if ref.confidence is not None else None
    else:
        values = predicted.astype(np.float64)
        result = stats.ks(values, ref.predicted)
        edges = stats.quantile_edges(ref.predicted)
        psi = stats.psi(
            stats.binned_counts(values, edges), stats.binned_counts(ref.predicted, edges)
        )
        mean = ref_mean = None
    return PredictionDrift(
        result.test, result.statistic, result.p_value, psi, mean, ref_mean,
        bool(result.p_value < p_value),
    )  # fmt: skip
