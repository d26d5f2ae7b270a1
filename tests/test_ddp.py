"""Data-parallel training with the real `torchrun` (2 processes, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from engine import checkpoint as ckpt


def torchrun(
    *args: str, nproc: int = 2, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    launcher = Path(sys.executable).with_name("torchrun")
    command = (
        [str(launcher)] if launcher.exists() else [sys.executable, "-m", "torch.distributed.run"]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [*command, "--standalone", f"--nproc-per-node={nproc}", "-m", "engine.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def best_model_test_accuracy(run_dir: Path) -> float:
    """Accuracy of ``best.pt``'s weights on the run's test split, in this one process."""
    import torch
    from omegaconf import OmegaConf

    from engine.data import build_dataset
    from engine.models import build_model

    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    dataset = build_dataset(cfg.data)
    model = build_model(cfg.model, dataset.info)
    model.load_state_dict(ckpt.load(run_dir / "checkpoints" / "best.pt")["model"])
    model.eval()
    with torch.no_grad():
        predicted = model(dataset.test.x).argmax(dim=1)
    return (predicted == dataset.test.y).float().mean().item()


@pytest.mark.slow
def test_two_process_ddp_trains_into_one_run_dir_and_refuses_a_resume_at_another_world_size(
    tmp_path,
):
    run_dir = tmp_path / "ddp"
    result = torchrun(
        "trainer.max_epochs=3", "optim.lr=3e-3", "trainer.device=cpu", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size=2" in result.stdout
    assert result.stdout.count("epoch 3/3") == 1  # only rank 0 speaks
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.8
    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["world_size"] == 2
    # Every rank tested best.pt's weights: the sharded test accuracy is that model's accuracy.
    assert metrics["test/acc"] == pytest.approx(best_model_test_accuracy(run_dir), abs=1e-6)
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1

    from conftest import run_cli

    single = run_cli(
        "trainer.max_epochs=4", "optim.lr=3e-3", "trainer.device=cpu", f"hydra.run.dir={run_dir}"
    )
    assert single.returncode == 2
    assert "world size 2, this run has 1" in single.stdout


@pytest.mark.slow
def test_ddp_without_an_explicit_run_dir_shares_rank_zeros_timestamped_dir(tmp_path):
    result = torchrun("trainer.max_epochs=1", "trainer.device=cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "metrics.json").exists()


@pytest.mark.slow
def test_under_ddp_the_deferred_guard_stops_every_rank_at_the_same_step(tmp_path):
    """The device decides on each rank from the all-reduced gradients, so the ranks agree without
    a collective of their own: both stop at the NaN's step (none hangs in the next all-reduce),
    and the last checkpoint is the step before."""
    run_dir = tmp_path / "ddp"
    result = torchrun(
        "trainer.max_epochs=2", "trainer.device=cpu", "trainer.nan_check=deferred",
        "trainer.ckpt_every_n_steps=1", f"hydra.run.dir={run_dir}",
        env={"ENGINE_FAULT_NAN_AT_STEP": "3"},
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "non-finite gradient norm (nan) at step 3 (epoch 1, batch 3)" in output, output[-3000:]
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["fit"]["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
