"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own.

Requests by endpoint and status and their latency, batch sizes, queue depth, the model that is
serving and how often it was swapped, the predicted-class distribution (or the predicted values),
and the drift statistics of ``engine.monitor`` for the current window. Endpoints are labelled by
their route template (``/v2/models/{name}/infer``), never by the raw path, so a client cannot grow
the number of series.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# "<name>_created" series double every counter for no use to a dashboard.
prometheus_client.disable_created_metrics()

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _powers_of_two(limit: int) -> tuple[float, ...]:
    out, size = [], 1
    while size < limit:
        out.append(float(size))
        size *= 2
    return (*out, float(limit))


class Metrics:
    def __init__(self, max_batch_size: int):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "engine_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "engine_request_seconds",
            "Time from a request's arrival to its answer",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram(
            "engine_batch_rows",
            "Rows per model call (dynamic batching)",
            buckets=_powers_of_two(max(2, max_batch_size)),
            registry=r,
        )
        self.queue_depth = Gauge("engine_queue_depth", "Requests waiting for the model", registry=r)
        self.rejected = Counter(
            "engine_overloaded", "Requests refused with 503 because the queue was full", registry=r
        )
        self.model = Gauge(
            "engine_model_info", "The model serving now (value 1)", ["model", "version"], registry=r
        )
        self.swaps = Counter(
            "engine_model_swaps", "Times a new model version replaced the serving one", registry=r
        )
        self.reload_failures = Counter(
            "engine_model_reload_failures",
            "Reloads that failed (the previous version kept serving)",
            registry=r,
        )
        self.predicted_class = Counter(
            "engine_predicted_class",
            "Predicted rows by class",
            ["model", "version", "label"],
            registry=r,
        )
        self.predicted_value = Histogram(
            "engine_predicted_value",
            "Predicted regression values (target units)",
            ["model", "version"],
            registry=r,
        )
        self.drift_rows = Gauge(
            "engine_drift_window_rows", "Rows in the drift window", ["model"], registry=r
        )
        labels = ["model", "feature", "test"]
        self.drift_statistic = Gauge(
            "engine_drift_statistic", "Per-feature drift statistic", labels, registry=r
        )
        self.drift_p_value = Gauge(
            "engine_drift_p_value", "Per-feature drift p-value", labels, registry=r
        )
        self.drift_psi = Gauge(
            "engine_drift_psi", "Per-feature population stability index", labels, registry=r
        )
        self.drift_alarm = Gauge(
            "engine_drift_alarm",
            "1 while a feature (or 'prediction') is in drift alarm",
            ["model", "feature"],
            registry=r,
        )
        self.mean_confidence = Gauge(
            "engine_prediction_mean_confidence",
            "Mean confidence of the predictions in the drift window",
            ["model"],
            registry=r,
        )
        self.reference_confidence = Gauge(
            "engine_prediction_reference_mean_confidence",
            "Mean confidence of the model on its reference (training) rows",
            ["model"],
            registry=r,
        )

    def serving(self, name: str, version: str, previous: str | None = None) -> None:
        if previous is not None:
            self.model.remove(name, previous)
        self.model.labels(name, version).set(1)

    def predicted(
        self,
        name: str,
        version: str,
        class_index: np.ndarray | None,
        values: np.ndarray | None,
        class_names: list[str],
    ) -> None:
        if class_index is not None:
            counts = np.bincount(class_index, minlength=len(class_names))
            for index in np.flatnonzero(counts):
                self.predicted_class.labels(name, version, class_names[index]).inc(
                    int(counts[index])
                )
        elif values is not None:
            child = self.predicted_value.labels(name, version)
            for value in values.tolist():
                child.observe(value)

    def drift(self, name: str, report: Any) -> None:
        """Set the drift gauges from an ``engine.monitor.DriftReport``."""
        self.drift_rows.labels(name).set(report.rows)
        if not report.enough:
            return
        for f in report.features:
            for gauge, value in (
                (self.drift_statistic, f.statistic),
                (self.drift_p_value, f.p_value),
                (self.drift_psi, f.psi),
            ):
                gauge.labels(name, f.name, f.test).set(float("nan") if value is None else value)
            self.drift_alarm.labels(name, f.name).set(1 if f.alarm else 0)
        p = report.prediction
        if p is not None:
            for gauge, value in (
                (self.drift_statistic, p.statistic),
                (self.drift_p_value, p.p_value),
                (self.drift_psi, p.psi),
            ):
                gauge.labels(name, "prediction", p.test).set(
                    float("nan") if value is None else value
                )
            self.drift_alarm.labels(name, "prediction").set(1 if p.alarm else 0)
            if p.mean_confidence is not None:
                self.mean_confidence.labels(name).set(p.mean_confidence)
            if p.reference_mean_confidence is not None:
                self.reference_confidence.labels(name).set(p.reference_mean_confidence)

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)
