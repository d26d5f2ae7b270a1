"""Nothing lost: real runs killed with SIGKILL and resumed, kills during a checkpoint write,
unwritable and full disks, and the NaN guard, all through the real CLI.

Kills at a chosen step come from the engine's fault hooks (engine/faults.py): the process
SIGKILLs itself exactly as a kill from outside would find it, which makes the kill points
reproducible; one test also kills from outside at random moments.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tb_reader
import torch
from conftest import REPO, make_unwritable, make_writable

from engine import checkpoint as ckpt

# digits with batch 128: 10 optimizer steps per epoch, 30 in all.
WORKLOAD = [
    "model.hidden=32",
    "data.batch_size=128",
    "trainer.max_epochs=3",
    "trainer.seed=7",
    "trainer.ckpt_every_n_steps=2",
    "trainer.log_every_n_steps=1",
    "trainer.device=cpu",
]
STEPS = 30


def train(cli, run_dir: Path, *extra: str, env: dict | None = None):
    return cli(*WORKLOAD, *extra, f"hydra.run.dir={run_dir}", env=env)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    state = ckpt.load(path)
    flat = {f"model.{k}": v for k, v in state["model"].items()}
    for index, per_param in state["optimizer"]["state"].items():
        for name, value in per_param.items():
            flat[f"optim.{index}.{name}"] = torch.as_tensor(value)
    return flat


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import run_cli

    run_dir = tmp_path_factory.mktemp("reference")
    result = train(run_cli, run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.slow
def test_killed_at_random_steps_and_resumed_ends_bit_identical(cli, tmp_path, reference):
    kill_steps = sorted(random.Random(2026).sample(range(2, STEPS), 5))
    assert any(step % 10 not in (0, 1) for step in kill_steps)  # mid-epoch kills included
    ref_curve = tb_reader.load(reference / "tb").Scalars("train/loss")
    for step in kill_steps:
        run_dir = tmp_path / f"kill_{step}"
        killed = train(cli, run_dir, env={"ENGINE_FAULT_KILL_AT_STEP": str(step)})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = train(cli, run_dir)
        assert resumed.returncode == 0, resumed.stderr
        assert "resumed from" in resumed.stdout
        assert_bit_identical(
            reference / "checkpoints" / "last.pt", run_dir / "checkpoints" / "last.pt"
        )
        curve = tb_reader.load(run_dir / "tb").Scalars("train/loss")
        assert [e.step for e in curve] == list(range(1, STEPS + 1)), (
            f"gap or duplicate after kill at {step}"
        )
        assert [e.value for e in curve] == [e.value for e in ref_curve]


@pytest.mark.slow
def test_a_kill_during_the_checkpoint_write_leaves_the_previous_checkpoint_loadable(
    cli, tmp_path, reference
):
    for save_number in (1, 4):
        run_dir = tmp_path / f"save_{save_number}"
        killed = train(cli, run_dir, env={"ENGINE_FAULT_KILL_DURING_SAVE": str(save_number)})
        assert killed.returncode == -signal.SIGKILL
        folder = run_dir / "checkpoints"
        # The interrupted write went to a new temporary or into the spare (see engine/checkpoint.py)
        spare = ckpt.spare_path(folder / "last.pt")
        interrupted = list(folder.glob(".last.pt.tmp.*")) + [spare] * spare.exists()
        assert interrupted, "the kill should have interrupted a write"
        with pytest.raises(ckpt.CheckpointError, match="corrupt"):
            ckpt.load(interrupted[0])  # half written: refused, never mistaken for a checkpoint
        if save_number == 1:
            assert not (folder / "last.pt").exists()
        else:
            state = ckpt.load(folder / "last.pt")  # the previous, complete checkpoint
            assert state["fit"]["global_step"] == 2 * (save_number - 1)
        resumed = train(cli, run_dir)
        assert resumed.returncode == 0, resumed.stderr
        assert not list(folder.glob(".*.tmp.*"))
        assert_bit_identical(reference / "checkpoints" / "last.pt", folder / "last.pt")


@pytest.mark.slow
def test_kills_from_outside_at_random_moments_always_leave_a_loadable_checkpoint(tmp_path):
    rng = random.Random(11)
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "engine.train",
        "data=synthetic",
        "data.n_samples=20000",
        "trainer.max_epochs=50",
        "trainer.ckpt_every_n_steps=1",
        "trainer.device=cpu",
        f"hydra.run.dir={run_dir}",
    ]
    last = run_dir / "checkpoints" / "last.pt"
    steps = []
    for _ in range(5):
        before = last.stat().st_mtime_ns if last.exists() else None
        proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until this process writes its first checkpoint
            if last.exists() and last.stat().st_mtime_ns != before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        steps.append(ckpt.load(last)["fit"]["global_step"])
    assert all(b > a for a, b in zip(steps, steps[1:])), (
        steps
    )  # each restart resumed and progressed


# deferred: the device skips the step and the host learns of it one step later
# (engine/step_guard.py); auto is immediate on the CPU.
@pytest.mark.parametrize("nan_check", ["auto", "deferred"])
def test_a_nan_stops_the_run_before_the_optimizer_step_and_names_it(cli, tmp_path, nan_check):
    run_dir = tmp_path / "run"
    result = train(
        cli,
        run_dir,
        "trainer.ckpt_every_n_steps=1",
        f"trainer.nan_check={nan_check}",
        env={"ENGINE_FAULT_NAN_AT_STEP": "5"},
    )
    assert result.returncode == 2
    assert "non-finite loss (nan) at step 5 (epoch 1, batch 5)" in result.stdout
    assert "optimizer did not step" in result.stdout and "last.pt" in result.stdout
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["fit"]["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.parametrize("nan_check", ["auto", "deferred"])
def test_on_nan_skip_skips_the_step_and_finishes(cli, tmp_path, nan_check):
    result = train(
        cli,
        tmp_path / "run",
        "trainer.on_nan=skip",
        f"trainer.nan_check={nan_check}",
        env={"ENGINE_FAULT_NAN_AT_STEP": "5"},
    )
    assert result.returncode == 0, result.stderr
    assert "step skipped (1 so far)" in result.stdout


def test_an_unwritable_checkpoint_folder_fails_clearly_and_keeps_the_old_checkpoint(cli, tmp_path):
    run_dir = tmp_path / "run"
    assert train(cli, run_dir, "trainer.max_epochs=1").returncode == 0
    folder = run_dir / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    if not make_unwritable(folder):
        make_writable(folder)
        pytest.skip("cannot make a folder unwritable here (no chattr for root)")
    try:
        result = train(cli, run_dir, "trainer.max_epochs=2")
    finally:
        make_writable(folder)
    assert result.returncode == 2
    assert (
        f"could not write checkpoint {folder / 'last.pt'}: the folder is not writable"
        in result.stdout
    )
    assert "the previous last.pt is intact" in result.stdout
    assert (folder / "last.pt").read_bytes() == before


def test_a_full_disk_fails_clearly_and_keeps_the_old_checkpoint(cli, tmp_path):
    run_dir = tmp_path / "disk"
    run_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(run_dir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        assert train(cli, run_dir, "trainer.max_epochs=1").returncode == 0
        last = run_dir / "checkpoints" / "last.pt"
        before = last.read_bytes()
        # Without its spare file (which a save overwrites in place, needing no new space) the
        # next save needs room that the filler takes.
        ckpt.spare_path(last).unlink()
        free = os.statvfs(run_dir).f_bavail * os.statvfs(run_dir).f_frsize
        (run_dir / "filler").write_bytes(b"\0" * max(0, free - 64 * 1024))
        result = train(cli, run_dir, "trainer.max_epochs=2", "trainer.ckpt_every_n_steps=0")
        assert result.returncode == 2
        assert "could not write checkpoint" in result.stdout and "the disk is full" in result.stdout
        assert last.read_bytes() == before
        assert not list(last.parent.glob(".*.tmp.*"))
    finally:
        subprocess.run(["umount", str(run_dir)], capture_output=True)


def test_a_corrupt_checkpoint_is_refused_with_a_clear_message(cli, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    result = train(cli, run_dir)
    assert result.returncode == 2
    assert (
        "is corrupt or not one of ours" in result.stdout and "trainer.resume=never" in result.stdout
    )


def test_resuming_with_a_changed_model_says_what_differs(cli, tmp_path):
    run_dir = tmp_path / "run"
    assert train(cli, run_dir, "trainer.max_epochs=1").returncode == 0
    result = train(cli, run_dir, "model.hidden=64")
    assert result.returncode == 2
    assert "model.hidden: 32 -> 64" in result.stdout


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A finished one-epoch run of the workload, read (never resumed) by the tests below."""
    from conftest import run_cli

    run_dir = tmp_path_factory.mktemp("one_epoch")
    result = train(run_cli, run_dir, "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr
    return run_dir


def test_resuming_with_changed_optimizer_or_schedule_values_is_refused(cli, tmp_path, one_epoch):
    last = one_epoch / "checkpoints" / "last.pt"
    result = train(
        cli,
        tmp_path / "run",
        f"trainer.resume={last}",
        "trainer.max_epochs=2",
        "optim.lr=0.5",
        "sched.min_lr_ratio=0.1",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "optim.lr: 0.001 -> 0.5" in result.stdout
    assert "sched.min_lr_ratio: 0.0 -> 0.1" in result.stdout
    assert f"trainer.init_from={last}" in result.stdout  # the way to new values from these weights


def test_init_from_starts_from_the_weights_only_and_a_rerun_resumes(cli, tmp_path, one_epoch):
    run_dir = tmp_path / "finetune"
    best = one_epoch / "checkpoints" / "best.pt"
    # A learning rate so small that the weights after an epoch are still those it started from.
    tuned = [f"trainer.init_from={one_epoch}", "optim.lr=1e-12"]
    first = train(cli, run_dir, *tuned, "trainer.max_epochs=1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"initialised the model weights from {best}" in first.stdout
    assert "epoch 1/1" in first.stdout  # the counters started at 0: that epoch was trained
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    per_epoch = STEPS // 3  # WORKLOAD has 3 epochs
    assert state["fit"]["global_step"] == per_epoch
    assert state["scheduler"]["base_lrs"] == [1e-12, 1e-12]  # a fresh schedule at the new lr
    assert state["optimizer"]["state"][0]["step"].item() == per_epoch  # a fresh optimizer
    source = ckpt.load(best)["model"]
    assert all(torch.allclose(state["model"][k], v, atol=1e-6) for k, v in source.items())

    again = train(cli, run_dir, *tuned, "trainer.max_epochs=2")  # e.g. after a kill
    assert again.returncode == 0, again.stdout + again.stderr
    assert "not applied: resuming from" in again.stdout and "resumed from" in again.stdout
    assert "initialised the model weights" not in again.stdout
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["fit"]["global_step"] == 2 * per_epoch


def test_init_from_weights_that_do_not_fit_the_model_names_the_tensor(cli, tmp_path, one_epoch):
    last = one_epoch / "checkpoints" / "last.pt"
    result = train(cli, tmp_path / "run", f"trainer.init_from={last}", "model.hidden=48")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: checkpoint {last} (trainer.init_from) does not fit this model" in result.stdout
    assert "body.0.weight has shape [32, 64] there, [48, 64] in this model" in result.stdout


def _set(entry: str, value):
    def corrupt(state):
        *parents, leaf = entry.split(".")
        node = state
        for key in parents:
            node = node[key]
        node[leaf] = value

    return corrupt


def _drop(entry: str):
    return lambda state: state.pop(entry)


def _shorten_python_words(state):
    words = state["rng"]["python"]["words"]
    state["rng"]["python"]["words"] = words[:-1]  # as another Python's random state might be


BAD_CONTENTS = {
    "optimizer": _drop("optimizer"),
    "fit": _set("fit", "epoch 1, step 10"),
    "rng.python": _shorten_python_words,
    "rng.numpy": _set("rng.numpy.kind", "PCG64"),
}


@pytest.mark.parametrize("entry", list(BAD_CONTENTS))
def test_a_checkpoint_with_bad_contents_is_refused_naming_the_entry(
    cli, tmp_path, one_epoch, entry
):
    state = ckpt.load(one_epoch / "checkpoints" / "last.pt")
    BAD_CONTENTS[entry](state)
    bad = tmp_path / "bad.pt"
    ckpt.save_atomic(state, bad)  # a correct CRC: only the contents are wrong
    result = train(cli, tmp_path / "run", f"trainer.resume={bad}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: checkpoint {bad} cannot be resumed: entry '{entry}'" in result.stdout


@pytest.fixture(scope="module")
def fresh_trainer(tmp_path_factory):
    """The workload's trainer built in this process (nothing trained), to load states into."""
    from hydra import compose, initialize_config_dir

    from engine.train import build_job

    overrides = [*WORKLOAD, "trainer.resume=never"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    job = build_job(cfg, tmp_path_factory.mktemp("in_process"), hparams_session=False)
    yield job.trainer
    job.logger.close()


def _shorten(entry: str):
    def corrupt(state):
        *parents, leaf = entry.split(".")
        node = state
        for key in parents:
            node = node[int(key) if isinstance(node, list) else key]
        node[leaf] = node[leaf][:-1]

    return corrupt


def _reshape_first_moment(state):
    state["optimizer"]["state"][0] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2, 2)}


MORE_BAD_CONTENTS = {
    **BAD_CONTENTS,
    "fit.global_step": _set("fit.global_step", "10"),
    "fit.epochs": _set("fit.epochs", 1),
    "world_size": _set("world_size", "1"),
    "scaler": _set("scaler", "none"),
    "scheduler.base_lrs": _shorten("scheduler.base_lrs"),
    "rng.torch": _shorten("rng.torch"),
    "optimizer.param_groups": _shorten("optimizer.param_groups"),
    "optimizer.state.0.exp_avg": _reshape_first_moment,
}


@pytest.mark.parametrize("entry", list(MORE_BAD_CONTENTS))
def test_bad_contents_are_refused_before_any_of_the_state_is_loaded(tmp_path, fresh_trainer, entry):
    trainer = fresh_trainer
    path = tmp_path / "bad.pt"
    ckpt.save_atomic(trainer.state_dict(), path)
    state = ckpt.load(path)  # a copy of the trainer's own state, then damaged
    state["model"] = {k: torch.full_like(v, 7.0) for k, v in state["model"].items()}
    MORE_BAD_CONTENTS[entry](state)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    with pytest.raises(ckpt.CheckpointError) as refused:
        trainer.load_state_dict(state, path)
    assert f"checkpoint {path} cannot be resumed: entry '{entry}'" in str(refused.value)
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the weights were not loaded
    assert not trainer.optimizer.state and trainer.state.global_step == 0
