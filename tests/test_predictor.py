"""The one loader of a trained model and its preprocessing: raw rows in, the data's own terms out,
the same numbers as the run that trained it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import run_cli

from engine import preprocess
from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.data import split_table
from engine.dataset import DataError, DataInfo
from engine.predictor import load_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("predictor") / "run"
    result = run_cli("trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


def _raw_test_rows(predictor):
    table = split_table(predictor.cfg.data)
    frame = pd.DataFrame(table.x[table.test], columns=predictor.feature_names)
    return frame, table.y[table.test]


def test_a_loaded_run_predicts_raw_test_rows_with_the_accuracy_the_run_reported(run_dir):
    predictor = load_run(run_dir)
    frame, y = _raw_test_rows(predictor)
    predictions = predictor.predict(frame)
    truth = preprocess.class_names(y, predictor.info)
    accuracy = float(np.mean(np.array(predictions.labels) == np.array(truth)))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert accuracy == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert predictions.probabilities.shape == (len(frame), 10)
    assert np.allclose(predictions.probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(predictions.confidence, predictions.probabilities.max(axis=1))


def test_columns_are_read_by_name_not_by_position(run_dir):
    predictor = load_run(run_dir)
    frame, _ = _raw_test_rows(predictor)
    shuffled = frame[list(reversed(frame.columns))]
    assert np.array_equal(predictor.predict(shuffled).outputs, predictor.predict(frame).outputs)


def test_a_missing_column_and_a_non_numeric_cell_are_named(run_dir):
    predictor = load_run(run_dir)
    frame, _ = _raw_test_rows(predictor)
    with pytest.raises(DataError, match="pixel_0_3"):
        predictor.inputs(frame.drop(columns=["pixel_0_3"]), "rows.csv")
    bad = frame.astype(object)
    bad.iloc[4, 7] = "seven"
    with pytest.raises(DataError, match=r"rows.csv: column 'pixel_0_7' .*'seven' in data row 5"):
        predictor.inputs(bad, "rows.csv")


def test_last_and_a_missing_checkpoint(run_dir, tmp_path):
    assert load_run(run_dir, "last").checkpoint.name == "last.pt"
    with pytest.raises(ConfigError, match="no such folder"):
        load_run(tmp_path / "nowhere")
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / ".hydra" / "config.yaml").write_text(
        (run_dir / ".hydra" / "config.yaml").read_text()
    )
    (tmp_path / "empty" / "data_info.json").write_text((run_dir / "data_info.json").read_text())
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt"):
        load_run(tmp_path / "empty")


def test_labels_match_by_value_as_the_training_file_wrote_them():
    info = DataInfo("classification", 1, 3, class_names=["3", "5", "7"])
    got = preprocess.class_indices([5, 3.0, "7", "7.0"], info, "new.csv", "label")
    assert got.tolist() == [1, 0, 2, 2]
    with pytest.raises(DataError, match=r"new.csv: column 'label' .*'4'"):
        preprocess.class_indices([3, 4], info, "new.csv", "label")


def test_regression_outputs_come_back_in_the_targets_units():
    info = DataInfo("regression", 2, 0, target_mean=150.0, target_std=20.0)
    assert preprocess.target_units(np.array([0.0, 1.0, -0.5]), info).tolist() == [150, 170, 140]
