"""The sweep's building blocks without training: grammar -> distributions, grid, slots, recovery.

One shared suite runs over every sampler (the optuna tests' pattern); the storage tests use a
real journal file, as a sweep does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from engine.config import ConfigError
from engine.search import storage as st
from engine.search.samplers import SAMPLERS, make_sampler, trial_seed
from engine.search.space import Param, grid, parse_space
from engine.search.spec import Spec

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_sweep_grammar_maps_to_optuna_distributions():
    from omegaconf import OmegaConf

    base = OmegaConf.create({"model": {"hidden": 128, "dropout": 0.1}, "optim": {"lr": 1e-3}})
    space, fixed = parse_space(
        [
            "optim.lr=tag(log, interval(1e-4, 1e-1))",
            "model.hidden=interval(32, 256)",  # an int key: an int distribution
            "model.dropout=range(0.0, 0.5, 0.1)",
            "model=choice(mlp,cnn)",
            "+extra=1,2,3",
            "trainer.max_epochs=3",
        ],
        {"optim.weight_decay": "choice(0.0, 0.01)"},
        base,
    )
    assert fixed == ["trainer.max_epochs=3"]
    assert list(space) == [
        "optim.weight_decay",
        "optim.lr",
        "model.hidden",
        "model.dropout",
        "model",
        "extra",
    ]
    assert space["optim.lr"].distribution() == FloatDistribution(1e-4, 1e-1, log=True)
    assert space["model.hidden"].distribution() == IntDistribution(32, 256)
    assert space["model.dropout"].values() == [0.0, 0.1, 0.2, 0.3, 0.4]
    assert space["model"].distribution() == CategoricalDistribution(["mlp", "cnn"])
    assert space["extra"].to_override(2) == "+extra=2"
    assert space["optim.lr"].to_override(0.1 + 0.2) == "optim.lr=0.3"


def test_the_command_line_replaces_or_fixes_preset_keys():
    preset = {"optim.lr": "interval(1e-4, 1e-2)", "model.hidden": "choice(32, 64)"}
    space, fixed = parse_space(["optim.lr=1e-3", "model.hidden=choice(8,16,32)"], preset)
    assert list(space) == ["model.hidden"] and space["model.hidden"].choices == [8, 16, 32]
    assert fixed == ["optim.lr=1e-3"]


@pytest.mark.parametrize(
    "arguments, preset, message",
    [
        ([], {}, "the search space is empty"),
        (["optim.lr=1e-3"], {"optim.lr": "interval(1e-4, 1e-2)"}, "the search space is empty"),
        (["optim.lr=interval(1, 0)"], {}, "optim.lr=interval(1, 0) is empty"),
        (["model.hidden=range(4, 4)"], {}, "model.hidden=range(4, 4) is empty"),
        (["optim.lr=tag(log, interval(0, 1))"], {}, "log interval needs a > 0"),
        ([], {"optim.lr": "interval(1e-4"}, "search.params: optim.lr='interval(1e-4'"),
        ([], {"optim.lr": "0.1"}, "is one value, not a sweep"),
        (["search.n_trials=1,2"], {}, "cannot sweep over search.n_trials"),
    ],
)
def test_an_empty_or_malformed_space_is_refused_naming_the_key(arguments, preset, message):
    with pytest.raises(ConfigError, match=None) as err:
        parse_space(arguments, preset)
    assert message in str(err.value)


@pytest.mark.parametrize("preset", SAMPLERS)
def test_every_search_preset_composes_selects_the_engine_sweeper_and_has_a_space(preset):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from engine.config import register_configs, validate

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"search={preset}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.startswith("hydra_plugins.engine_sweeper.")
    assert cfg.search.sampler == preset and cfg.search.seed == 0
    space, _ = parse_space([], dict(cfg.search.params), cfg)
    assert {"optim.lr", "model.hidden"} <= set(space)
    if preset == "grid":
        assert len(grid(space)) > 1 and cfg.search.n_trials is None
    validate(cfg)


def test_grid_takes_every_combination_once_and_refuses_continuous_keys():
    space, _ = parse_space(["a=choice(1,2)", "b=range(0,3)"], {})
    combos = grid(space)
    assert len(combos) == 6 and len({tuple(c.items()) for c in combos}) == 6
    continuous, _ = parse_space(["a=interval(0,1)"], {})
    with pytest.raises(ConfigError, match="a=interval\\(0,1\\) is continuous"):
        grid(continuous)


def test_a_param_survives_the_json_round_trip_of_the_spec():
    space, fixed = parse_space(["x=tag(log, interval(1e-3, 1))", "m=choice(mlp,'a b')"], {})
    spec = Spec(sweep_dir="/s", config_dir="/c", config_name="train", fixed=fixed)
    spec.space = {n: p.to_dict() for n, p in space.items()}
    back = Spec.from_json(spec.to_json()).params()
    assert back == space
    assert isinstance(back["x"], Param) and back["m"].to_override("a b") == "m=a\\ b"


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_samples_inside_the_space_and_is_seeded(name):
    space, _ = parse_space(
        ["lr=tag(log, interval(1e-4, 1e-1))", "hidden=range(8, 65, 8)", "act=choice(relu,gelu)"],
        {},
    )

    def draws(seed: int) -> list[dict]:
        study = optuna.create_study(directions=["maximize"] * (2 if name == "nsga2" else 1))
        out = []
        for number in range(6):
            study.sampler = make_sampler(name, trial_seed(seed, number), 6)
            trial = study.ask()
            params = {n: p.suggest(trial) for n, p in space.items()}
            value = -abs(params["lr"] - 0.01) - params["hidden"] / 1000
            study.tell(trial, [value, value] if name == "nsga2" else value)
            out.append(params)
        return out

    first = draws(0)
    assert first == draws(0)
    assert draws(2**32 - 1)  # the largest search.seed: its trials' seeds wrap around
    for params in first:
        assert 1e-4 <= params["lr"] <= 1e-1 and params["hidden"] in range(8, 65, 8)
        assert params["act"] in ("relu", "gelu")


# --------------------------------------------------------------------------------------------
# slots, claims, recovery (a real journal file)


def _study(tmp_path, n_trials: int, sampler: str = "random", space=None) -> tuple:
    storage = st.open_storage(str(tmp_path / "study.journal"))
    study = optuna.create_study(study_name="s", storage=storage)
    spec = Spec(sweep_dir=str(tmp_path), config_dir="", config_name="train", sampler=sampler)
    spec.n_trials = n_trials
    spec.space = {n: p.to_dict() for n, p in (space or {}).items()}
    return storage, study, spec


def test_top_up_enqueues_exactly_the_missing_slots(tmp_path):
    storage, study, spec = _study(tmp_path, 5)
    assert st.top_up(study, spec) == 5 and st.top_up(study, spec) == 0
    study_id = storage.get_study_id_from_name("s")
    for _ in range(3):
        t = st.claim(storage, study_id)
        assert t.state == TrialState.RUNNING and t.user_attrs["worker"] == st.worker_info()
        study.tell(t.number, 1.0)
    spec.n_trials = 7  # a re-run with a larger budget adds only the difference
    assert st.top_up(study, spec) == 2
    assert st.budget(study.get_trials()) == (3, 0, 4)


def test_grid_slots_cover_each_combination_once(tmp_path):
    space, _ = parse_space(["a=choice(1,2)", "b=choice(x,y,z)"], {})
    storage, study, spec = _study(tmp_path, 6, "grid", space)
    st.top_up(study, spec)
    fixed = [t.system_attrs["fixed_params"] for t in study.get_trials()]
    assert sorted(map(str, fixed)) == sorted(map(str, grid(space)))


def test_concurrent_claims_never_take_the_same_trial(tmp_path):
    storage, study, spec = _study(tmp_path, 40)
    st.top_up(study, spec)
    study_id = storage.get_study_id_from_name("s")
    taken: list[int] = []

    def worker():
        own = st.open_storage(str(tmp_path / "study.journal"))  # as separate processes do
        while (t := st.claim(own, study_id)) is not None:
            taken.append(t.number)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(40))


def _claimed_with_x(tmp_path, n_trials: int) -> tuple:
    """A study of ``n_trials`` slots whose first trial is claimed and has drawn x=0.25."""
    storage, study, spec = _study(tmp_path, n_trials)
    st.top_up(study, spec)
    study_id = storage.get_study_id_from_name("s")
    trial = st.claim(storage, study_id)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    storage.set_trial_param(trial_id, "x", 0.25, FloatDistribution(0, 1))
    return storage, study, spec, study_id, trial, trial_id


def test_a_trial_whose_worker_died_is_failed_and_retried_with_its_params(tmp_path):
    storage, study, spec, study_id, trial, trial_id = _claimed_with_x(tmp_path, 2)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    storage.set_trial_user_attr(trial_id, "worker", {"host": st.HOST, "pid": int(dead.stdout)})
    alive = st.claim(storage, study_id)
    alive_id = storage.get_trial_id_from_study_id_trial_number(study_id, alive.number)
    storage.set_trial_user_attr(alive_id, "worker", st.worker_info())  # this process: alive
    assert st.recover(study, storage) == [trial.number]
    trials = study.get_trials()
    assert trials[trial.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING
    retry = trials[-1]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_of"] == trial.number
    assert retry.system_attrs["fixed_params"] == {"x": 0.25}
    # The interruption is not part of the budget; its retry is.
    assert st.budget(trials) == (0, 1, 1) and st.top_up(study, spec) == 0
    assert st.recover(study, storage) == []  # idempotent: one retry per interruption
    assert len(study.get_trials()) == len(trials)


def test_a_retry_of_a_trial_killed_while_drawing_its_params_draws_the_rest(tmp_path):
    storage, study, _, study_id, killed, _ = _claimed_with_x(tmp_path, 1)  # "y" never drawn
    st.fail_interrupted(study, killed, "interrupted: its worker process stopped", storage)
    st.recover(study, storage)
    retry = st.claim(storage, study_id)
    assert retry.user_attrs["retry_of"] == killed.number
    trial = optuna.Trial(study, retry._trial_id)
    assert trial.suggest_float("x", 0, 1) == 0.25
    assert 0 <= trial.suggest_float("y", 0, 1) <= 1


def test_failures_in_a_row_count_from_the_session_start(tmp_path):
    storage, study, _ = _study(tmp_path, 0)
    for state in (TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL):
        t = study.ask()
        study.tell(t, 1.0 if state == TrialState.COMPLETE else None, state=state)
    trials = study.get_trials()
    assert st.failures_in_a_row(trials, "") == 2
    assert st.failures_in_a_row(trials, "2999-01-01T00:00:00") == 0


def test_process_alive_sees_a_dead_pid_and_a_reused_one():
    assert st.process_alive(st.worker_info())
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert not st.process_alive({"pid": int(gone.stdout)})
    reused = dict(st.worker_info(), start="1")  # same pid, another start time
    assert os.path.exists("/proc") is False or not st.process_alive(reused)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"pruner": "median"}, "pruning needs a single objective"),
        ({"directions": ["maximize"]}, "give one direction per metric"),
        ({"metrics": None}, "search.directions is set but search.metrics is not"),
        ({"n_trials": 0}, "search.n_trials=0 is invalid"),
    ],
)
def test_search_settings_that_cannot_work_are_refused(changes, message):
    from omegaconf import OmegaConf

    from engine.config import SearchConfig, validate_search

    cfg = OmegaConf.structured(
        SearchConfig(sampler="nsga2", metrics=["val/acc", "val/ece"], directions=["max", "min"])
    )
    cfg.directions = ["maximize", "minimize"]
    for key, value in changes.items():
        setattr(cfg, key, value)
    with pytest.raises(ConfigError) as err:
        validate_search(cfg)
    assert message in str(err.value)
