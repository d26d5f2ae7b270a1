"""The task vocabulary (engine/task.py) agrees with the data and the metrics it names."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from engine.config import DataConfig
from engine.data import build_dataset, describe_task
from engine.metrics import ClassificationMetrics, RegressionMetrics
from engine.task import Task, optuna_direction, resolve_monitor


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "digits"},
        {"name": "breast_cancer"},
        {"name": "wine"},
        {"name": "diabetes"},
        {"name": "synthetic", "n_samples": 200, "n_classes": 4},
        {"name": "synthetic", "n_samples": 200, "n_classes": 0},
    ],
)
def test_the_task_learnt_without_the_data_is_the_task_of_the_built_data(overrides):
    cfg = data_cfg(**overrides)
    built = Task.of(build_dataset(cfg).info)
    described = describe_task(cfg)
    assert (described.kind, described.num_classes) == (built.kind, built.num_classes)


def test_a_csv_tasks_classes_are_read_from_its_target_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("x,label\n" + "".join(f"{i},{'abc'[i % 3]}\n" for i in range(30)))
    cfg = data_cfg(name="csv", path=str(path), target="label")
    assert describe_task(cfg) == Task("classification", 3)
    assert Task.of(build_dataset(cfg).info).num_classes == 3


@pytest.mark.parametrize("num_classes", [3, 10])
def test_the_classification_names_are_the_keys_the_metrics_report(num_classes):
    metrics = ClassificationMetrics(num_classes)
    metrics.update(torch.randn(64, num_classes), torch.randint(0, num_classes, (64,)))
    assert set(metrics.compute()) == set(Task("classification", num_classes).metric_names())


def test_the_regression_names_are_the_keys_the_metrics_report():
    metrics = RegressionMetrics()
    metrics.update(torch.randn(64), torch.randn(64))
    assert set(metrics.compute()) == set(Task("regression").metric_names())


def test_monitor_and_direction_follow_the_task_and_the_metric_name():
    assert resolve_monitor("auto", "auto", Task("classification", 10)) == ("val/acc", "max")
    assert resolve_monitor("auto", "auto", Task("regression")) == ("val/rmse", "min")
    assert resolve_monitor("auto", "auto", Task("lm", 100)) == ("val/loss", "min")
    assert resolve_monitor("val/r2", "auto", Task("regression")) == ("val/r2", "max")
    assert optuna_direction("val/ece", "auto") == "minimize"
    assert optuna_direction("val/top5", "auto") == "maximize"


def test_regression_values_go_back_to_the_targets_units():
    task = Task("regression", target_mean=150.0, target_std=20.0)
    assert task.in_target_units(torch.tensor([0.0, 1.0])).tolist() == [150.0, 170.0]
