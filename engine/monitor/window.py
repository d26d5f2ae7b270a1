"""The server's sliding window: the last ``capacity`` predicted rows (raw inputs, predictions,
confidences) in a ring buffer, for the drift report to compare against the reference.

The server adds from its batching worker and computes the report from another thread, so
``add`` and ``snapshot`` hold one lock; both only copy arrays, so the lock is held briefly.
"""

from __future__ import annotations

import threading

import numpy as np


class Window:
    """A thread-safe ring buffer of the last ``capacity`` rows."""

    def __init__(self, capacity: int, n_features: int):
        if capacity < 1:
            raise ValueError(f"a window holds at least one row (capacity={capacity})")
        self.capacity = capacity
        self.n_features = n_features
        self._lock = threading.Lock()
        self._x = np.zeros((capacity, n_features), np.float32)
        self._predicted: np.ndarray | None = None  # allocated on the first add: its dtype
        self._confidence = np.full(capacity, np.nan, np.float64)
        self._next = 0  # the slot the next row goes to
        self._size = 0

    def __len__(self) -> int:
        with self._lock:
            return self._size

    def add(
        self, x_raw: np.ndarray, predicted: np.ndarray, confidence: np.ndarray | None = None
    ) -> None:
        """Append rows: ``x_raw`` [n, F] raw features, ``predicted`` [n] class indices (int64)
        or values, ``confidence`` [n] or None. When more than ``capacity`` rows come at once,
        only the last ``capacity`` are kept."""
        x_raw = np.asarray(x_raw, dtype=np.float32).reshape(-1, self.n_features)
        predicted = np.asarray(predicted).reshape(-1)
        n = len(x_raw)
        if len(predicted) != n or (confidence is not None and len(confidence) != n):
            raise ValueError("x_raw, predicted and confidence must have one entry per row")
        conf = (
            np.full(n, np.nan) if confidence is None else np.asarray(confidence, np.float64)
        ).reshape(-1)
        if n > self.capacity:
            x_raw, predicted, conf = (
                x_raw[-self.capacity :],
                predicted[-self.capacity :],
                conf[-self.capacity :],
            )
            n = self.capacity
        with self._lock:
            if self._predicted is None:
                dtype = np.int64 if np.issubdtype(predicted.dtype, np.integer) else np.float64
                self._predicted = np.zeros(self.capacity, dtype)
            slots = (self._next + np.arange(n)) % self.capacity
            self._x[slots] = x_raw
            self._predicted[slots] = predicted
            self._confidence[slots] = conf
            self._next = (self._next + n) % self.capacity
            self._size = min(self._size + n, self.capacity)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Copies of (x_raw [n, F], predicted [n], confidence [n] or None when no row had
        one), oldest row first."""
        with self._lock:
            order = (self._next - self._size + np.arange(self._size)) % self.capacity
            x = self._x[order]
            predicted = (
                self._predicted[order] if self._predicted is not None else np.zeros(0, np.int64)
            )
            confidence = self._confidence[order]
        return x, predicted, (confidence if np.isfinite(confidence).any() else None)
