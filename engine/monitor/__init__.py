"""Drift monitoring: are a model's recent inputs and predictions still like its training data?

    python -m engine.monitor model=digits-mlp@production input=predictions.jsonl

stats.py      the two-sample tests (Kolmogorov-Smirnov, chi-square) and the population
              stability index
drift.py      the reference (training rows and the model's predictions on them), the report of
              a window against it, and the alarm rule (Bonferroni over features)
window.py     the server's sliding window of recent rows (thread-safe ring buffer)
log.py        the prediction log (JSON lines, written off the request path) and its reader
options.py    ``monitor.*`` settings (shared with the server) and the offline command line
__main__.py   the offline report of a CSV or a prediction log
"""

from engine.monitor.drift import (
    DriftReport,
    FeatureDrift,
    PredictionDrift,
    Reference,
    compare,
)
from engine.monitor.log import PredictionLog, read_log
from engine.monitor.options import MonitorSettings
from engine.monitor.window import Window

__all__ = [
    "DriftReport",
    "FeatureDrift",
    "MonitorSettings",
    "PredictionDrift",
    "PredictionLog",
    "Reference",
    "Window",
    "compare",
    "read_log",
]
