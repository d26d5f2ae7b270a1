"""Every file under conf/ composes against the typed schema; schedules and models behave."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.config import ConfigError, check_override_keys, register_configs, validate
from engine.data import DataInfo
from engine.models import build_model
from engine.optim import lr_factor

CONF = Path(__file__).resolve().parents[1] / "conf"
register_configs()


def group_options():
    for group in ("data", "model", "loss", "optim", "sched", "trainer"):
        for yaml in sorted((CONF / group).glob("*.yaml")):
            yield group, yaml.stem


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("group, option", list(group_options()))
def test_every_config_option_composes_and_validates(group, option):
    extra = ["data.path=x.csv", "data.target=y"] if (group, option) == ("data", "csv") else []
    cfg = compose_train(f"{group}={option}", *extra)
    validate(cfg)


def test_defaults_are_the_main_job():
    cfg = compose_train()
    assert cfg.data.name == "digits" and cfg.model.name == "mlp" and cfg.search is None
    assert OmegaConf.select(cfg, "trainer.device") == "auto"


def test_override_key_check_suggests_the_closest_key():
    message = check_override_keys(["optim.lr=1e-3", "optim.lrr=2"])
    assert "optim.lrr" in message and "optim.lr" in message
    assert (
        check_override_keys(["model=cnn", "optim.lr=choice(1e-3,1e-2)", "+extra=1", "--cfg"])
        is None
    )


def test_override_key_check_covers_the_search_group_but_not_its_space():
    assert "Did you mean 'search.n_trials'" in check_override_keys(["search.n_trails=3"])
    assert (
        check_override_keys(["search.n_trials=3", "search.params.optim.lr=interval(0.1,1)"]) is None
    )


@pytest.mark.parametrize(
    "args",
    [
        ["-sc", "install=bash"],
        ["--shell-completion", "query=bash"],
        ["-cd", "dir/a=b", "-cn", "x=y", "-cp", "p=q"],
        ["--config-dir", "a=b", "--config-name", "x=y", "--config-path", "p=q"],
        ["--config-dir=a=b", "--config-n", "x=y"],  # argparse takes a unique prefix
        ["-p", "trainer=x", "--package", "a=b", "-c", "job", "--cfg", "all"],
        ["-i", "config", "--info", "defaults", "--experimental-rerun", "a=b.pickle"],
    ],
)
def test_override_key_check_skips_hydras_options_and_their_values(args):
    assert check_override_keys(args) is None


def test_override_key_check_still_reads_an_override_after_a_flag():
    assert "trainer.max_epocs" in check_override_keys(["-i", "trainer.max_epocs=3"])
    assert "trainer.max_epocs" in check_override_keys(["--resolve", "trainer.max_epocs=3"])


def test_validate_refuses_a_key_added_to_a_typed_group_but_not_to_the_search_space():
    with pytest.raises(ConfigError, match="'trainer.max_epoch'.*Did you mean 'trainer.max_epochs'"):
        validate(compose_train("+trainer.max_epoch=1"))
    validate(compose_train("search=tpe"))  # search.params: config keys -> sweeps, a free dict


def test_validate_names_the_key_of_a_bad_choice():
    cfg = compose_train("sched.name=cosin")
    with pytest.raises(ConfigError, match="sched.name='cosin'.*Did you mean 'cosine'"):
        validate(cfg)


def test_warmup_then_cosine_decay():
    sched = OmegaConf.create(
        {"name": "cosine", "warmup_steps": 10, "warmup_fraction": 0.0, "min_lr_ratio": 0.1}
    )
    assert lr_factor(sched, 0, 110, 10) == pytest.approx(0.1)
    assert lr_factor(sched, 9, 110, 10) == pytest.approx(1.0)
    assert lr_factor(sched, 60, 110, 10) == pytest.approx(0.55)
    assert lr_factor(sched, 110, 110, 10) == pytest.approx(0.1)


def test_step_schedule_decays_every_step_size_epochs():
    sched = OmegaConf.create(
        {"name": "step", "warmup_steps": 0, "warmup_fraction": 0.0, "step_size": 2, "gamma": 0.5}
    )
    assert [lr_factor(sched, e * 10, 100, 10) for e in range(5)] == [1.0, 1.0, 0.5, 0.5, 0.25]


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
def test_models_map_features_to_class_logits(name):
    cfg = compose_train(f"model={name}").model
    info = DataInfo("classification", 64, 10, input_shape=(1, 8, 8))
    assert build_model(cfg, info)(torch.randn(5, 64)).shape == (5, 10)


def test_regression_models_return_one_value_per_row():
    cfg = compose_train("model=mlp").model
    assert build_model(cfg, DataInfo("regression", 10, 0))(torch.randn(4, 10)).shape == (4,)


def test_cnn_refuses_tabular_data():
    cfg = compose_train("model=cnn").model
    with pytest.raises(ValueError, match="model=cnn needs image-shaped data"):
        build_model(cfg, DataInfo("classification", 13, 3))
