"""The friendly ``POST /predict`` body: rows as the training CSV had them.

    {"rows": [{"pixel_0_0": 0, "pixel_0_1": 5, ...}, ...]}

Each row maps every feature column of the training data to its value in raw units (a number, or
a numeric string as a CSV cell holds it); the answer gives, per row, the class label as the
training data wrote it, its probability and every class's, or a regression value in the target's
units. The features are standardised by ``engine.preprocess.standardize``, as in evaluation and
``engine.predict``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.serve.protocol import BadInput, check_rows, field_of


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    rows: list[dict[str, Any]] = Field(min_length=1, description="one object per row")


def parse_request(body: bytes) -> PredictRequest:
    try:
        return PredictRequest.model_validate_json(body)
    except ValidationError as err:
        where, message = field_of(err)
        if where == "rows" and "at least 1" in message:
            raise BadInput("rows", "rows: the batch is empty; send at least one row.") from None
        raise BadInput(where, f"{where}: {message}") from None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or value is None:
        raise BadInput(where, f"{where}: {value!r} is not a number; the model reads a number.")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise BadInput(where, f"{where}: {value!r} is not a number; the model reads a number.")


def features_of(request: PredictRequest, feature_names: list[str], max_rows: int) -> np.ndarray:
    """The rows as a raw [N, F] float64 matrix in the model's feature order."""
    rows = request.rows
    if len(rows) > max_rows:
        raise BadInput(
            "rows",
            f"rows: {len(rows)} rows is over serve.max_rows={max_rows}; split the batch.",
            status=413,
        )
    wanted = len(feature_names)
    matrix = []
    for i, row in enumerate(rows):
        try:
            values = [row[name] for name in feature_names]
        except KeyError:
            missing = [n for n in feature_names if n not in row]
            raise BadInput(
                f"rows.{i}.{missing[0]}",
                f"rows.{i}: {len(missing)} feature(s) missing: {', '.join(missing[:8])}"
                f"{' ...' if len(missing) > 8 else ''}.",
            ) from None
        if len(row) != wanted:
            extra = [k for k in row if k not in set(feature_names)]
            raise BadInput(
                f"rows.{i}.{extra[0]}",
                f"rows.{i}: {', '.join(repr(k) for k in extra[:8])} is not a feature of this "
                f"model; send only its features ({', '.join(feature_names[:8])}"
                f"{' ...' if wanted > 8 else ''}).",
            )
        # The common case, all plain numbers, is checked in one pass; the rest name the cell.
        if not all(type(v) is float or type(v) is int for v in values):
            values = [_number(v, f"rows.{i}.{n}") for v, n in zip(values, feature_names)]
        matrix.append(values)
    x = np.array(matrix, dtype=np.float64)
    check_rows(x, feature_names, max_rows, "rows", cell=lambda row, name: f"rows.{row}.{name}")
    return x


def answer(
    model_name: str,
    version: str,
    request_id: str | None,
    labels: list[str] | None,
    probabilities: np.ndarray | None,
    confidence: np.ndarray | None,
    values: np.ndarray | None,
    class_names: list[str],
) -> dict[str, Any]:
    if values is not None:
        predictions = [{"value": float(v)} for v in values.tolist()]
    else:
        predictions = [
            {
                "label": label,
                "confidence": conf,
                "probabilities": dict(zip(class_names, probs)),
            }
            for label, conf, probs in zip(labels, confidence.tolist(), probabilities.tolist())
        ]
    body: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request_id is not None:
        body["id"] = request_id
    body["predictions"] = predictions
    return body
