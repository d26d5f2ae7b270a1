"""The prediction log: one JSON line per predicted row, appended by a background thread so a
request never waits on the disk.

    {"time": "2026-12-02T17:09:51.123Z", "model": "digits-mlp", "version": "3",
     "endpoint": "/predict", "request_id": "...", "predicted": "7", "class_index": 7,
     "confidence": 0.98, "inputs": {"pixel_0_0": 0.0, ...}}

``inputs`` is written only when the log is opened with ``log_inputs=True`` (the server's
``serve.log_inputs``, off by default): rows may hold personal data. A log with inputs is created
readable by its owner alone. Predictions and their confidences are always written; they are
what ``python -m engine.monitor`` needs for prediction drift, inputs for feature drift.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import DataError

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0  # the longest a written row waits in memory before reaching the file
QUEUE_BATCHES = 10_000  # write() calls held while the disk is slow; beyond, rows are dropped
_STOP = object()


def _plain(value: Any) -> Any:
    """NumPy scalars (and arrays) as the JSON types they stand for."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


class PredictionLog:
    """An append-only JSON-lines file of predictions, written from a background thread."""

    def __init__(self, path: Path, feature_names: list[str], log_inputs: bool = False):
        self.path = Path(path)
        self.feature_names = list(feature_names)
        self.log_inputs = bool(log_inputs)
        self.dropped = 0  # rows lost because the queue was full (the disk could not keep up)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if self.log_inputs else 0o644
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self._closed = False
        self._close_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def write(
        self,
        model: str,
        version: str,
        endpoint: str,
        request_ids: list[str] | str,
        predicted: list[Any],
        class_index: list[int] | None,
        confidence: list[float] | None,
        x_raw: np.ndarray | None = None,
    ) -> None:
        """Queue one line per row (``request_ids`` one per row, or one for all of them); the
        inputs ``x_raw`` [n, F] are kept only when the log was opened with ``log_inputs``."""
        if self._closed:
            raise RuntimeError(f"the prediction log {self.path} is closed")
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        stamp = stamp.replace("+00:00", "Z")
        inputs = (
            np.array(x_raw, dtype=np.float64) if self.log_inputs and x_raw is not None else None
        )
        item = (stamp, model, str(version), endpoint, request_ids, list(predicted),
                class_index, confidence, inputs)  # fmt: skip
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            if self.dropped == 0:
                log.warning(
                    "prediction log %s: the disk is not keeping up; dropping rows", self.path
                )
            self.dropped += len(item[5])

    def _lines(self, item: tuple) -> str:
        stamp, model, version, endpoint, request_ids, predicted, class_index, confidence, x = item
        out = []
        for i, value in enumerate(predicted):
            record: dict[str, Any] = {
                "time": stamp,
                "model": model,
                "version": version,
                "endpoint": endpoint,
                "request_id": request_ids if isinstance(request_ids, str) else request_ids[i],
                "predicted": _plain(value),
                "class_index": None if class_index is None else int(class_index[i]),
                "confidence": None if confidence is None else float(confidence[i]),
            }
            if x is not None:
                record["inputs"] = dict(zip(self.feature_names, x[i].tolist()))
            out.append(json.dumps(record, default=_plain))
        return "".join(line + "\n" for line in out)

    def _run(self) -> None:
        last_flush, pending = time.monotonic(), False
        while True:
            try:
                item = self._queue.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                item = None
            if item is _STOP:
                break
            if item is not None:
                try:
                    self._file.write(self._lines(item))
                    pending = True
                except (OSError, ValueError, TypeError, IndexError) as err:
                    log.error("prediction log %s: a batch was not written: %s", self.path, err)
            now = time.monotonic()
            if pending and (self._queue.empty() or now - last_flush >= FLUSH_SECONDS):
                self._flush()
                last_flush, pending = now, False
        self._flush()

    def _flush(self) -> None:
        try:
            self._file.flush()
        except OSError as err:
            log.error("prediction log %s: flush failed: %s", self.path, err)

    def close(self) -> None:
        """Write everything queued, stop the thread and close the file (idempotent)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._file.close()

    def __enter__(self) -> PredictionLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The log's lines as dicts. A final line cut short (the server stopped mid-write) is
    skipped; any other line that is not a JSON object is a ``DataError`` naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"input={path}: cannot read the prediction log ({err.strerror}).") from err
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # no newline after it: an interrupted write
                log.warning("%s: line %d is incomplete; skipped", path, number)
                continue
            raise DataError(f"input={path}: line {number} is not JSON ({err.msg}).") from err
        if not isinstance(record, dict) or "predicted" not in record:
            raise DataError(
                f"input={path}: line {number} is not a prediction log record (a JSON object "
                f"with 'predicted'); pass a log the server wrote or a CSV of rows."
            )
        records.append(record)
    return records


def log_arrays(
    records: list[dict[str, Any]], feature_names: list[str] | None = None, source: str = "log"
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(x_raw [n, F] or None when no record has inputs, predicted [n], confidence [n] or None).
    ``predicted``: class indices (int64) when every record has one, else the predicted values
    (regression). Records without inputs in a log that has some get a row of NaN."""
    if not records:
        return None, np.zeros(0, np.int64), None
    if all(r.get("class_index") is not None for r in records):
        predicted = np.array([r["class_index"] for r in records], dtype=np.int64)
    else:
        try:
            predicted = np.array([float(r["predicted"]) for r in records], dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"{source}: some records have a label as 'predicted' but no 'class_index'; a "
                f"classification log needs both."
            ) from err
    confidence = np.array(
        [np.nan if r.get("confidence") is None else float(r["confidence"]) for r in records]
    )
    with_inputs = [r for r in records if isinstance(r.get("inputs"), dict)]
    x = None
    if with_inputs:
        names = list(feature_names or with_inputs[0]["inputs"])
        x = np.full((len(records), len(names)), np.nan, np.float32)
        for i, record in enumerate(records):
            inputs = record.get("inputs")
            if not isinstance(inputs, dict):
                continue
            missing = [n for n in names if n not in inputs]
            if missing:
                raise DataError(
                    f"{source}: record {i + 1}'s inputs lack the feature(s) "
                    f"{', '.join(missing[:8])}; the log was written for another model."
                )
            x[i] = [inputs[n] for n in names]
    return x, predicted, (confidence if np.isfinite(confidence).any() else None)


def read_log(
    path: Path, feature_names: list[str] | None = None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """A prediction log's (x_raw [n, F] or None when it holds no inputs, predicted [n],
    confidence [n] or None), in the order it was written. ``feature_names`` orders the
    inputs' columns (default: the order of the first record with inputs)."""
    return log_arrays(read_records(path), feature_names, f"input={path}")
