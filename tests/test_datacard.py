"""The data card: what a run was trained on, documented from the rows themselves."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf

from engine import datacard
from engine.config import DataConfig
from engine.data import dataset_from_table, split_table


def _data(**values):
    return OmegaConf.structured(DataConfig(**values))


def _card(cfg):
    table = split_table(cfg)
    info = dataset_from_table(table, cfg.standardize).info
    return table, datacard.describe_table(cfg, table, info)


def _write_csv(path, rows):
    path.write_text("\n".join(["a,b,note,label", *rows]) + "\n")


def _rows(n=60):
    return [f"{i % 7},{(i * 3) % 5},n{i},{'cat' if i % 3 else 'dog'}" for i in range(n)]


def test_the_card_of_an_embedded_dataset_counts_its_rows_classes_and_features():
    table, card = _card(_data(name="digits"))
    assert card["source"] == {
        "kind": "embedded",
        "name": "digits",
        "version": card["source"]["version"],
    }
    assert card["rows"] == {"total": 1797, "train": 1257, "val": 270, "test": 270}
    for split, counts in card["class_balance"].items():
        assert sum(counts.values()) == card["rows"][split]
        assert counts["3"] == int((table.y[getattr(table, split)] == 3).sum())
    pixel = card["features"][10]
    raw = table.x[table.train][:, 10].astype(np.float64)
    assert pixel["name"] == "pixel_1_2"
    assert (pixel["mean"], pixel["max"]) == (float(raw.mean()), float(raw.max()))
    assert card["fingerprint"] == datacard.rows_fingerprint(
        table.x[table.train], table.y[table.train]
    )


def test_a_csv_card_names_the_file_its_hash_the_dropped_columns_and_the_label_mapping(tmp_path):
    path = tmp_path / "pets.csv"
    _write_csv(path, _rows())
    cfg = _data(name="csv", path=str(path), target="label", features=["a", "b"])
    _, card = _card(cfg)
    assert card["source"]["path"] == str(path) and card["source"]["bytes"] == path.stat().st_size
    assert card["source"]["sha256"] == datacard.file_sha256(path)
    assert card["columns"] == {"used": ["a", "b"], "dropped": ["note"], "target": "label"}
    assert card["label_mapping"] == {"cat": 0, "dog": 1}
    datacard.write(card, tmp_path)
    text = (tmp_path / "data_card.md").read_text()
    assert "`note`" in text and card["fingerprint"] in text and "| cat |" in text
    assert datacard.read(tmp_path) == card


def test_a_changed_cell_changes_the_fingerprint_and_an_unchanged_file_keeps_it(tmp_path):
    path = tmp_path / "pets.csv"
    cfg = _data(name="csv", path=str(path), target="label", features=["a", "b"])
    rows = _rows()
    _write_csv(path, rows)
    _, first = _card(cfg)
    _, again = _card(cfg)
    table, _ = _card(cfg)
    train_row = int(table.train[0])
    rows[train_row] = rows[train_row].replace(f"{train_row % 7},", "9,", 1)
    _write_csv(path, rows)
    _, changed = _card(cfg)
    assert again["fingerprint"] == first["fingerprint"]
    assert changed["fingerprint"] != first["fingerprint"]
    assert changed["source"]["sha256"] != first["source"]["sha256"]


def test_a_regression_card_describes_the_target_per_split():
    table, card = _card(_data(name="diabetes"))
    test = card["target_distribution"]["test"]
    assert test["mean"] == float(table.y[table.test].astype(np.float64).mean())
    assert test["q00"] <= test["q50"] <= test["q100"]
    assert "class_balance" not in card
