"""Every user mistake on the command line ends the same way through the real CLI: exit code 2,
a line `error: ...` naming the key, no traceback on the console, nothing trained. Also Hydra's
shell completion, whose words are commands, not overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_unwritable, make_writable


def assert_refused(result, *names: str) -> str:
    """Exit code 2, an `error: ` line naming every one of ``names``, no traceback; that line."""
    console = result.stdout + result.stderr
    assert result.returncode == 2, console
    assert "Traceback" not in console, console
    lines = [line for line in console.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, console
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# --- shell completion (Hydra's -sc) ---------------------------------------------------------


def test_shell_completion_installs_the_bash_function(cli):
    result = cli("-sc", "install=bash")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hydra_bash_completion()" in result.stdout
    assert "complete -o nospace -o default -F hydra_bash_completion" in result.stdout


@pytest.mark.parametrize(
    "line, expected",
    [
        ("python -m engine.train trainer.max_", "trainer.max_epochs="),
        ("python -m engine.train optim.lr=1e-3 model=", "model=cnn"),
    ],
)
def test_a_completion_query_for_the_module_lists_the_matching_keys(cli, line, expected):
    # COMP_LINE as Hydra's bash function passes it: the whole line typed so far.
    result = cli("-sc", "query=bash", env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout.split()


def test_tab_completion_in_bash_completes_the_engine_train_command():
    """Hydra's own bash function, installed and called the way bash calls it on <TAB>."""
    bin_dir = Path(sys.executable).parent
    command = bin_dir / "engine-train"
    assert command.exists(), "pip install -e . installs the engine-train command"
    script = f"""
eval "$({command} -sc install=bash)"
COMP_LINE="engine-train trainer.max_"
COMP_POINT=${{#COMP_LINE}}
COMP_CWORD=1
hydra_bash_completion
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert {"trainer.max_epochs=", "trainer.max_nan_skips="} <= set(result.stdout.split())


# --- unknown keys of the typed groups, however they are added -------------------------------


def _typo_from_a_config_dir(tmp_path: Path) -> list[str]:
    (tmp_path / "extra" / "trainer").mkdir(parents=True)
    (tmp_path / "extra" / "trainer" / "short.yaml").write_text(
        "defaults:\n  - default\n  - _self_\nmax_epoch: 1\n"
    )
    return ["--config-dir", str(tmp_path / "extra"), "trainer=short"]


@pytest.mark.parametrize("way", ["plus", "plus_plus", "config_dir_yaml"])
def test_an_unknown_key_of_a_typed_group_is_refused_however_it_is_added(cli, tmp_path, way):
    args = {
        "plus": lambda: ["+trainer.max_epoch=1"],
        "plus_plus": lambda: ["++trainer.max_epoch=1"],
        "config_dir_yaml": lambda: _typo_from_a_config_dir(tmp_path),
    }[way]()
    run_dir = tmp_path / "run"
    result = cli(*args, "trainer.device=cpu", f"hydra.run.dir={run_dir}")
    assert_refused(result, "'trainer.max_epoch'", "Did you mean 'trainer.max_epochs'?")
    assert not (run_dir / "checkpoints").exists()


# --- deletions and sweeps Hydra cannot do -----------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [("~trainer.seed", "trainer.seed"), ("~trainer.seed=0", "trainer.seed"), ("~model", "model")],
)
def test_deleting_a_key_of_the_typed_config_is_refused(cli, tmp_path, override, key):
    result = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, key, "cannot be")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sweep", ["optim.lr=interval(1e-4,1e-2)", "optim.lr=tag(log, interval(1e-4,1e-2))"]
)
def test_an_interval_without_a_search_preset_names_the_engine_sweeper(cli, tmp_path, sweep):
    result = cli("-m", sweep, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert_refused(result, "optim.lr", "search=tpe")
    assert not (tmp_path / "sweep").exists()


def test_a_list_sweep_without_a_search_preset_still_runs_hydras_basic_sweep(cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = cli(
        "-m",
        "optim.lr=1e-3,1e-2",
        "data=synthetic",
        "data.n_samples=100",
        "data.n_features=4",
        "data.n_classes=0",  # regression: no classification figures to draw
        "model=linear",
        "trainer.max_epochs=1",
        "trainer.device=cpu",
        "trainer.save_checkpoints=false",
        f"hydra.sweep.dir={sweep_dir}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (sweep_dir / "trial_0" / "metrics.json").exists()
    assert (sweep_dir / "trial_1" / "metrics.json").exists()


# --- values the config refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.max_epochs=ten", "trainer.max_epochs"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.compile=maybe", "trainer.compile"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_key(cli, tmp_path, override, key):
    result = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    line = assert_refused(result, f"error: {key}:", f"'{override}'")
    assert "append" not in line and "+" + key not in line  # Hydra's advice for a new key
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, options",
    [
        ("model=resnet", "cnn, linear, mlp, transformer"),
        ("data=mnist", "breast_cancer, csv, diabetes, digits, synthetic, text, wine"),
        ("optim=adamw2", "adam, adamw, sgd"),
    ],
)
def test_an_unknown_group_option_lists_the_available_ones(cli, tmp_path, override, options):
    result = cli(override, f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, f"error: {override}:", options)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer.seed=-1"], "trainer.seed"),
        (["trainer.seed=4294967296"], "trainer.seed"),
        (["data=synthetic", "data.seed=-3"], "data.seed"),
        (["data.split_seed=-1"], "data.split_seed"),
        (["-m", "search=random", "search.seed=-1", "search.n_trials=1"], "search.seed"),
    ],
)
def test_an_out_of_range_seed_is_refused_with_its_key(cli, tmp_path, overrides, key):
    result = cli(
        *overrides,
        "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert_refused(result, key, "[0, 2**32 - 1]")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert not (tmp_path / "sweep" / "trial_0").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.hidden=99999999999"],  # a size no tensor can have
        ["model.hidden=1000000", "model.depth=3"],  # 2e12 parameters: 15 TiB of weights+grads
        ["model=cnn", "model.hidden=99999999999"],
    ],
)
def test_a_model_too_large_to_allocate_is_refused_before_any_compute(cli, tmp_path, overrides):
    run_dir = tmp_path / "run"
    result = cli(*overrides, "trainer.device=cpu", f"hydra.run.dir={run_dir}")
    assert_refused(result, "model.hidden=", "model.depth=")
    assert not (run_dir / "checkpoints").exists()
    assert not (run_dir / "tb").exists()


@pytest.mark.parametrize("run_dir", ["taken", "taken/run"])
def test_a_run_dir_that_is_a_file_is_refused(cli, tmp_path, run_dir):
    (tmp_path / "taken").write_text("not a folder")
    result = cli(f"hydra.run.dir={tmp_path / run_dir}")
    assert_refused(result, "hydra.run.dir", f"{tmp_path / 'taken'} is a file")


def test_a_run_dir_set_in_a_config_file_that_cannot_be_made_is_refused(cli, tmp_path):
    """Not on the command line, so only Hydra sees it, when it makes the run dir."""
    (tmp_path / "taken").write_text("not a folder")
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "mine.yaml").write_text(
        f"defaults:\n  - train\n  - _self_\nhydra:\n  run:\n    dir: {tmp_path / 'taken' / 'run'}\n"
    )
    result = cli("--config-dir", str(tmp_path / "extra"), "--config-name", "mine")
    assert_refused(result, "could not write", str(tmp_path / "taken"), "hydra.run.dir=")


def test_a_run_dir_in_a_read_only_folder_is_refused(cli, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    try:
        if not make_unwritable(folder):
            pytest.skip("cannot make a folder read-only here (root without chattr)")
        result = cli(f"hydra.run.dir={folder / 'run'}")
    finally:
        make_writable(folder)
    assert_refused(result, "hydra.run.dir", "is not writable")


def test_a_refused_run_keeps_the_traceback_in_train_log_only(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("trainer.seed=-1", "trainer.device=cpu", f"hydra.run.dir={run_dir}")
    assert_refused(result, "trainer.seed")
    log = (run_dir / "train.log").read_text()
    assert "Traceback (most recent call last)" in log
    assert "engine.config.ConfigError: trainer.seed=-1" in log


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.device=cuda:99"], "trainer.device=cuda:99"),
        (["model=cnn", "data=wine"], "model=cnn needs image-shaped data"),
        (["model=transformer"], "model=transformer is a language model"),
        (["loss.z_loss=0.1", "loss.fused=false"], "loss.z_loss needs the fused kernels"),
    ],
)
def test_the_engines_own_refusals_stay_user_errors(cli, tmp_path, overrides, message):
    # They used to ride on a bare ValueError, which no longer counts as a user error.
    result = cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_refused(result, message)
    assert not (tmp_path / "run" / "checkpoints").exists()
