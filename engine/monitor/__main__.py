"""``python -m engine.monitor model=<registered model | run dir> input=<rows.csv | log.jsonl>
[monitor.window=0] [monitor.p_value=0.05] [output=report.json] [fail_on_drift=false]``

The drift report the server computes, offline: a CSV of raw rows (the model predicts them) or
a prediction log, against the model's reference sample. Exit codes: 0 the report was made (with
or without alarms), 2 a user error (``error: ...`` names it), 3 something alarms and
``fail_on_drift=true``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from engine import preprocess
from engine.checkpoint import replace_file
from engine.config import ConfigError
from engine.dataset import DataError
from engine.model_source import ModelSource
from engine.monitor.drift import DriftReport, Reference, compare
from engine.monitor.log import log_arrays, read_records
from engine.monitor.options import MonitorOptions, parse
from engine.train import USER_ERRORS

LOG_SUFFIXES = (".jsonl", ".ndjson")
EXIT_DRIFT = 3


def _reference(options: MonitorOptions) -> tuple[Reference, str]:
    source = ModelSource(
        options.model, options.checkpoint, options.registry.storage, options.registry.store
    )
    loaded = source.load("cpu", with_reference=True)
    if loaded.reference is None:
        raise ConfigError(
            f"model={options.model}: it has no reference sample to compare against "
            f"({loaded.reference_reason or 'none was stored'}). Register the run again once its "
            f"training data can be read, or pass its run dir."
        )
    ref = Reference.build(loaded.reference, loaded.predictor, options.monitor.max_categories)
    return ref, f"{loaded.name}@{loaded.version} ({source.describe()})"


def _read_csv(path: Path, ref: Reference) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"input={path}: not a readable CSV ({str(err).splitlines()[0]}).") from err
    x = preprocess.feature_matrix(frame, ref.predictor.info, f"input={path}")
    predicted, confidence = ref.predict(x)
    return x, predicted, confidence


def _read_log(path: Path, ref: Reference, model_name: str):
    records = read_records(path)
    if not records:
        raise DataError(f"input={path}: the prediction log holds no records.")
    models = sorted({str(r.get("model")) for r in records})
    if len(models) > 1:  # a log shared by several servers: this model's rows only
        records = [r for r in records if r.get("model") == model_name]
        if not records:
            raise DataError(
                f"input={path}: the log holds predictions of {', '.join(models)}, none of "
                f"model {model_name}; pass the model that wrote it."
            )
    x, predicted, confidence = log_arrays(records, ref.feature_names, f"input={path}")
    if ref.task == "classification":
        if predicted.dtype.kind != "i":
            raise DataError(
                f"input={path}: the log holds values, not classes; its model is a regression."
            )
        if len(predicted) and (predicted.min() < 0 or predicted.max() >= max(ref.num_classes, 1)):
            raise DataError(
                f"input={path}: class_index values outside 0..{ref.num_classes - 1}; the log "
                f"was written by another model."
            )
    return x, predicted.astype(np.float64) if ref.task == "regression" else predicted, confidence


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def describe(report: DriftReport, title: str) -> str:
    """The report as a readable table, its alarm lines last."""
    lines = [title]
    if not report.enough:
        lines.append(
            f"only {report.rows} row(s), fewer than monitor.min_rows={report.min_rows}: no test "
            f"was run, nothing alarms."
        )
        return "\n".join(lines)
    if not report.inputs:
        lines.append(
            "the input holds no feature values (the server logs them only with "
            "serve.log_inputs=true): prediction drift only."
        )
    width = max([len(f.name) for f in report.features] + [len("prediction")])
    lines.append(f"{'feature':<{width}}  {'kind':<11}  {'test':<6}  {'statistic':>9}  "
                 f"{'p-value':>9}  {'PSI':>7}  alarm")  # fmt: skip
    for f in report.features:
        lines.append(
            f"{f.name:<{width}}  {f.kind:<11}  {f.test + ('*' if f.exact else ''):<6}  {_fmt(f.statistic):>9}  "
            f"{_fmt(f.p_value):>9}  {_fmt(f.psi):>7}  {'ALARM' if f.alarm else ''}"
        )
    p = report.prediction
    if p is not None:
        lines.append(
            f"{'prediction':<{width}}  {'':<11}  {p.test:<6}  {_fmt(p.statistic):>9}  "
            f"{_fmt(p.p_value):>9}  {_fmt(p.psi):>7}  {'ALARM' if p.alarm else ''}"
        )
        if p.mean_confidence is not None:
            lines.append(
                f"mean confidence {_fmt(p.mean_confidence)} "
                f"(reference {_fmt(p.reference_mean_confidence)})"
            )
    if any(f.exact for f in report.features):
        lines.append("chi2*: too few rows outside one value for chi-square; Fisher's exact p-value")
    lines.append(
        f"alarm rule: a feature's p-value < {report.p_value:g}/{len(report.features)} = "
        f"{report.threshold:.3g} (Bonferroni), the predictions' < {report.p_value:g}"
        if report.features
        else f"alarm rule: the predictions' p-value < {report.p_value:g}"
    )
    for f in report.features:
        if f.alarm:
            lines.append(
                f"ALARM {f.name}: {f.test} p={f.p_value:.3g} < {report.threshold:.3g} "
                f"(statistic {_fmt(f.statistic)}, PSI {_fmt(f.psi)})"
            )
    if p is not None and p.alarm:
        lines.append(
            f"ALARM prediction: {p.test} p={p.p_value:.3g} < {report.p_value:g} (PSI {_fmt(p.psi)})"
        )
    if not report.alarms:
        lines.append("no drift alarm")
    return "\n".join(lines)


def run(options: MonitorOptions) -> int:
    path = Path(options.input).expanduser()
    is_log = path.suffix.lower() in LOG_SUFFIXES
    if not is_log and path.suffix.lower() != ".csv":
        raise ConfigError(
            f"input={options.input}: use a CSV of rows (.csv) or a prediction log "
            f"({', '.join(LOG_SUFFIXES)})."
        )
    if not path.is_file():
        raise DataError(f"input={options.input}: no such file.")
    ref, model_title = _reference(options)
    model_name = model_title.split("@", 1)[0]
    x, predicted, confidence = _read_log(path, ref, model_name) if is_log else _read_csv(path, ref)
    window = options.monitor.window
    total = len(predicted)
    if window > 0:
        x = x[-window:] if x is not None else None
        predicted = predicted[-window:]
        confidence = confidence[-window:] if confidence is not None else None
    report = compare(
        ref, x, predicted, confidence, options.monitor.p_value, options.monitor.min_rows
    )
    shown = f"the last {len(predicted)} of {total}" if len(predicted) < total else f"{total}"
    title = (
        f"drift of {model_title}: {shown} row(s) of {path} against {ref.rows} reference "
        f"(training) rows"
    )
    print(describe(report, title))
    if options.output:
        output = Path(options.output).expanduser()
        output.parent.mkdir(parents=True, exist_ok=True)
        replace_file(output, json.dumps(report.to_dict(), indent=2) + "\n")
        print(f"wrote {options.output}")
    return EXIT_DRIFT if options.fail_on_drift and report.alarms else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(parse(sys.argv[1:] if argv is None else argv))
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
