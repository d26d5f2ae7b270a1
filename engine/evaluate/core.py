"""One evaluation: load the run's model (engine.predictor), score the rows, time the model,
slice by a column, and write eval.json, report.md, report.html and tb/."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import datacard, plots, predictor, preprocess
from engine.dataset import DataInfo
from engine.evaluate import classification, latency, lm, outputs, regression, report, slices, tb
from engine.evaluate.options import EvalOptions


def _device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _say(message: str) -> None:
    print(f"[evaluate] {message}", flush=True)


def _group_labels(rows: outputs.Rows, column: str, model: predictor.Predictor, bins: int):
    outputs.check_group_column(rows.frame, column, model, rows.source)
    names = preprocess.feature_names(model.info)
    if column in names:  # a feature: quantile buckets of its raw values
        raw = rows.frame[column].to_numpy(np.float64) if rows.frame is not None else None
        if raw is None:
            std = np.asarray(model.info.feature_std or [1.0] * len(names))
            mean = np.asarray(model.info.feature_mean or [0.0] * len(names))
            i = names.index(column)
            raw = rows.x[:, i].numpy() * std[i] + mean[i]
        return slices.feature_groups(raw, bins)
    return rows.frame[column].to_numpy()


@dataclass
class Scored:
    """One task's numbers and figures, and how to score a group of the rows (for slices)."""

    metrics: dict[str, Any]
    scalars: dict[str, float]
    images: dict[str, np.ndarray]
    score: Callable[[np.ndarray], dict[str, float]] | None
    fair: Callable[[list[np.ndarray]], dict[str, float]] | None = None
    probs: np.ndarray | None = None


def _classification(out: torch.Tensor, y: np.ndarray, names: list[str], c: int) -> Scored:
    m = classification.metrics(out, y, names)
    cal = m["calibration"]
    images = {
        "confusion_matrix": plots.confusion_matrix_image(np.array(m["confusion_matrix"])),
        "reliability": plots.reliability_diagram_image(
            cal["count"], cal["correct"], cal["conf_sum"]
        ),
        "confidence_histogram": plots.histogram_image(m["confidence_histogram"]),
    }
    probs = torch.softmax(out.double(), -1).numpy()
    pred = probs.argmax(1)

    def score(member: np.ndarray) -> dict[str, float]:
        part = out[torch.from_numpy(member)]
        return classification.scalars(classification.metrics(part, y[member], names))

    def fair(masks: list[np.ndarray]) -> dict[str, float]:
        return slices.fairness(y, pred, masks, c)

    return Scored(m, classification.scalars(m), images, score, fair, probs)


def _table_task(out: torch.Tensor, y: np.ndarray, info: DataInfo) -> Scored:
    if info.task == "classification":
        names = plots.class_names_or_default(info.class_names, info.num_classes)
        return _classification(out, y, names, info.num_classes)
    return _regression(preprocess.target_units(out.numpy().astype(np.float64), info), y)


def _language_model(model: predictor.Predictor, rows: outputs.Rows, batch: int) -> Scored:
    m = lm.metrics(model, rows.x, torch.from_numpy(rows.y), batch)
    return Scored(m, lm.scalars(m), {}, score=None)


def _regression(values: np.ndarray, y: np.ndarray) -> Scored:
    m = regression.metrics(values, y)

    def score(member: np.ndarray) -> dict[str, float]:
        return regression.scalars(regression.metrics(values[member], y[member]))

    images = {"residuals": plots.residual_image(values, y - values)}
    return Scored(m, regression.scalars(m), images, score)


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Evaluate and write ``<run dir>/eval/<name>/``; returns what eval.json holds."""
    run_dir = Path(options.run).expanduser()
    model = predictor.load_run(run_dir, options.checkpoint, _device(options.eval.device))
    cfg_data = outputs.data_config(model.cfg, options.data)
    new_file = "path" in options.data
    _say(f"loaded {model.checkpoint} on {model.device}")
    rows = (
        outputs.new_file_rows(cfg_data, model)
        if new_file
        else outputs.split_rows(cfg_data, model, options.split)
    )
    if options.eval.group_by:
        groups = _group_labels(rows, options.eval.group_by, model, options.eval.group_bins)
    name = options.name or (Path(str(cfg_data.path)).stem if new_file else options.split)
    _say(f"scoring {len(rows.y)} rows of {rows.source}")
    info = model.info
    if info.task == "lm":
        scored = _language_model(model, rows, options.eval.batch_size)
    else:
        out = outputs.model_outputs(model, rows.x, options.eval.batch_size)
        scored = _table_task(out, rows.y, info)
    m, scalars, images, probs = scored.metrics, scored.scalars, scored.images, scored.probs
    checkpoint = model.checkpoint.resolve()
    card = datacard.read(run_dir) or {}
    result: dict[str, Any] = {
        "name": name,
        "run": str(run_dir.resolve()),
        "task": info.task,
        "source": rows.source,
        "rows": int(len(rows.y)),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": datacard.file_sha256(checkpoint),
        "data_fingerprint": card.get("fingerprint"),
        "data_card": os.path.relpath(
            run_dir.resolve() / datacard.CARD_MD, run_dir.resolve() / "eval" / name
        ),
        "scalars": scalars,
        "metrics": m,
    }
    if options.eval.group_by:
        _say(f"slicing by {options.eval.group_by}")
        result["group_by"] = options.eval.group_by
        result["slices"] = slices.slice_report(
            groups, options.eval.min_group_size, scored.score, scored.fair
        )
    if options.eval.latency:
        _say("timing the model per batch size")
        result["latency"] = latency.measure(
            model,
            rows.x,
            list(options.eval.batch_sizes),
            options.eval.latency_warmup,
            options.eval.latency_iters,
        )
    folder = run_dir / "eval" / name
    # Written beside the old report and swapped in whole: a failed write keeps the previous one,
    # and a re-run leaves one TensorBoard event file, not a second set of the same scalars.
    staging = folder.with_name(f".{name}.writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "eval.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (staging / "report.md").write_text(report.markdown(result, images))
    (staging / "report.html").write_text(report.page(result, images))
    tb.write(
        staging / "tb",
        scalars,
        images,
        probs,
        rows.y if probs is not None else None,
        plots.class_names_or_default(info.class_names, info.num_classes),
    )
    _replace_folder(staging, folder)
    _say(f"{tb.summary(scalars)}")
    _say(f"wrote {folder}/ (report.md, report.html, eval.json, tb/)")
    result["folder"] = str(folder)
    return result


def _replace_folder(new: Path, old: Path) -> None:
    """Put ``new`` where ``old`` was; the old folder goes only once the new one is in place."""
    retired = old.with_name(f".{old.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if old.exists():
        old.rename(retired)
    new.rename(old)
    shutil.rmtree(retired, ignore_errors=True)
