"""The data card every run writes: which data it was trained on, documented from the rows.

``data_card.json`` holds every number, ``data_card.md`` the same for a person: the source (an
embedded dataset's name and the version of the library it ships with, or a file's path, size,
modification time and SHA-256), the columns used and dropped, the split sizes and seeds, the
class balance (or the target's distribution) per split, per-feature statistics in raw units,
the label mapping, and the fingerprint of the exact training rows: the SHA-256 of the training
split's feature and target bytes in row order. Two runs with the same fingerprint trained on the
same rows; a changed cell of the file changes it. The registry records the fingerprint and the
evaluation report links the card.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from engine.dataset import DataInfo, Dataset

CARD_JSON = "data_card.json"
CARD_MD = "data_card.md"
_QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rows_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of rows' features and targets, in order, with their shapes and dtypes."""
    digest = hashlib.sha256()
    for array in (x, y):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _source(cfg: Any) -> dict[str, Any]:
    if cfg.name == "csv":
        path = Path(cfg.path).expanduser().resolve()
        stat = path.stat()
        return {
            "kind": "file",
            "path": str(path),
            "bytes": stat.st_size,
            "modified": dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).isoformat(),
            "sha256": file_sha256(path),
        }
    if cfg.name == "synthetic":
        keys = ("n_samples", "n_features", "n_classes", "noise", "seed")
        return {"kind": "synthetic", "name": "synthetic", **{k: cfg[k] for k in keys}}
    import sklearn

    return {"kind": "embedded", "name": cfg.name, "version": f"scikit-learn {sklearn.__version__}"}


def _class_balance(y: np.ndarray, names: list[str]) -> dict[str, int]:
    counts = np.bincount(y, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts)}


def _distribution(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    values = values.astype(np.float64)
    q = np.quantile(values, _QUANTILES)
    out = {"mean": float(values.mean()), "std": float(values.std())}
    out.update({f"q{int(p * 100):02d}": float(v) for p, v in zip(_QUANTILES, q)})
    return out


def _feature_stats(x: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    x = x.astype(np.float64)
    stats = []
    for j, name in enumerate(names):
        col = x[:, j]
        stats.append(
            {
                "name": name,
                "mean": float(col.mean()),
                "std": float(col.std()),
                "min": float(col.min()),
                "max": float(col.max()),
                # a csv with a missing cell is refused before training: none reach a model
                "missing": int(np.isnan(col).sum()),
            }
        )
    return stats


def _csv_columns(cfg: Any, used: list[str]) -> dict[str, list[str]]:
    if cfg.name != "csv":
        return {"used": used, "dropped": []}
    from engine.data import header_names

    path = Path(cfg.path).expanduser().resolve()
    header = header_names(path, path.suffix.lower() in (".parquet", ".pq"))
    dropped = [c for c in header if c not in used and c != cfg.target]
    return {"used": used, "dropped": dropped, "target": cfg.target}


def describe_table(cfg: Any, table: Any, info: DataInfo) -> dict[str, Any]:
    """The card of a table dataset (``engine.data.Table``) and the info its run trained with."""
    from engine.preprocess import feature_names

    names = feature_names(info)
    splits = {"train": table.train, "val": table.val, "test": table.test}
    card: dict[str, Any] = {
        "source": _source(cfg),
        "task": info.task,
        "rows": {"total": int(len(table.x)), **{k: int(len(v)) for k, v in splits.items()}},
        "columns": _csv_columns(cfg, names),
        "split": {
            "seed": int(cfg.split_seed),
            "val_fraction": float(cfg.val_fraction),
            "test_fraction": float(cfg.test_fraction),
            "stratified": info.task == "classification",
        },
        "standardized": bool(cfg.standardize),
        "features": _feature_stats(table.x[table.train], names),
        "fingerprint": rows_fingerprint(table.x[table.train], table.y[table.train]),
    }
    if info.task == "classification":
        classes = info.class_names or [str(i) for i in range(info.num_classes)]
        card["classes"] = classes
        card["class_balance"] = {k: _class_balance(table.y[v], classes) for k, v in splits.items()}
        card["label_mapping"] = info.label_mapping
    else:
        card["target_distribution"] = {k: _distribution(table.y[v]) for k, v in splits.items()}
    return card


def describe_text(cfg: Any, dataset: Dataset) -> dict[str, Any]:
    """The card of ``data=text``: the corpus, the vocabulary and the token splits."""
    import sys

    info = dataset.info
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    return {
        "source": {
            "kind": "embedded",
            "name": "text",
            "version": f"Python {sys.version.split()[0]} standard library sources",
            "files": info.extra.get("files"),
            "tokens": info.extra.get("tokens"),
        },
        "task": "lm",
        "rows": {k: (len(v) if v is not None else 0) for k, v in splits.items()},
        "sequence_length": int(cfg.seq_len),
        "vocabulary": {"size": info.num_classes, "requested": int(cfg.vocab_size)},
        "split": {"seed": int(cfg.split_seed), "unit": "source file"},
        "fingerprint": rows_fingerprint(dataset.train.x.numpy(), dataset.train.y.numpy()),
    }


def _markdown(card: dict[str, Any]) -> str:
    src = card["source"]
    lines = ["# Data card", ""]
    if src["kind"] == "file":
        lines += [
            f"- source: file `{src['path']}`, {src['bytes']} bytes, modified {src['modified']}",
            f"- SHA-256: `{src['sha256']}`",
        ]
    else:
        extra = ", ".join(f"{k}={v}" for k, v in src.items() if k not in ("kind", "name"))
        lines.append(f"- source: {src['kind']} dataset `{src['name']}` ({extra})")
    lines += [
        f"- task: {card['task']}",
        f"- fingerprint of the training rows (SHA-256): `{card['fingerprint']}`",
        "",
        "## Rows and splits",
        "",
        "| split | rows |",
        "| --- | ---: |",
        *[f"| {k} | {v} |" for k, v in card["rows"].items()],
        "",
        "split: " + ", ".join(f"{k}={v}" for k, v in card["split"].items()),
    ]
    columns = card.get("columns")
    if columns:
        lines += [
            "",
            "## Columns",
            "",
            f"- used ({len(columns['used'])}): " + _listing(columns["used"]),
        ]
        lines.append("- dropped: " + (_listing(columns["dropped"]) or "none"))
        if columns.get("target"):
            lines.append(f"- target: `{columns['target']}`")
    if "class_balance" in card:
        splits = list(card["class_balance"])
        lines += ["", "## Class balance", "", "| class | " + " | ".join(splits) + " |"]
        lines.append("| --- |" + " ---: |" * len(splits))
        for name in card["classes"]:
            lines.append(
                f"| {name} | "
                + " | ".join(str(card["class_balance"][s][name]) for s in splits)
                + " |"
            )
        if card.get("label_mapping"):
            mapping = ", ".join(f"`{k}` -> {v}" for k, v in card["label_mapping"].items())
            lines += ["", f"label mapping: {mapping}"]
    if "target_distribution" in card:
        lines += ["", "## Target distribution", "", "| split | mean | std | min | median | max |"]
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for split, d in card["target_distribution"].items():
            if d:
                lines.append(
                    f"| {split} | {d['mean']:.4g} | {d['std']:.4g} | {d['q00']:.4g} | "
                    f"{d['q50']:.4g} | {d['q100']:.4g} |"
                )
    if card.get("features"):
        lines += ["", "## Features (training split, raw units)", ""]
        lines += ["| feature | mean | std | min | max | missing |", "| --- |" + " ---: |" * 5]
        for f in card["features"]:
            lines.append(
                f"| {f['name']} | {f['mean']:.4g} | {f['std']:.4g} | {f['min']:.4g} | "
                f"{f['max']:.4g} | {f['missing']} |"
            )
    if "vocabulary" in card:
        lines += [
            "",
            f"vocabulary: {card['vocabulary']['size']} tokens; sequence length "
            f"{card['sequence_length']}",
        ]
    return "\n".join(lines) + "\n"


def _listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def write(card: dict[str, Any], run_dir: Path) -> None:
    (run_dir / CARD_JSON).write_text(json.dumps(card, indent=2))
    (run_dir / CARD_MD).write_text(_markdown(card))


def read(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None
