"""Batch prediction: ``python -m engine.predict model=<registered model | run dir>
input=rows.csv output=preds.parquet``, the same preprocessing and model as evaluation and
serving, streamed in chunks (``engine.predict.batch``)."""

from engine.predict.batch import Written, predict_file

__all__ = ["Written", "predict_file"]
