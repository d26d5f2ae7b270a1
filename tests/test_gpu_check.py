"""The device check rehearsed on the CPU: every part of scripts/gpu_check.sh runs with tiny sizes
and the CPU fallbacks, so that on the GPU machine nothing but the GPU can fail."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import REPO

# What the device tool brings back: at most 8 files, each named in letters, digits, '.', '_', '-'.
FILES = {"env.txt", "tests.txt", "loss.md", "metrics.md", "train.md", "sweep.txt", "progress.txt",
         "summary.md"}  # fmt: skip
PARTS = ("tests", "loss", "metrics", "train", "sweep")


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_writes_the_files_the_device_returns(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert {p.name for p in tmp_path.iterdir()} == FILES
    summary = (tmp_path / "summary.md").read_text()
    for part in PARTS:
        assert f"- {part}: ok in " in summary, summary + (tmp_path / "progress.txt").read_text()
    assert "| digits |" in (tmp_path / "train.md").read_text()
    assert "| text |" in (tmp_path / "train.md").read_text()
    assert "2 trials finished: 2 complete" in (tmp_path / "sweep.txt").read_text()
    assert "acceptance ratios" in (tmp_path / "loss.md").read_text()
    assert (
        "test_on_a_gpu_no_step_between_log_steps_synchronises"
        in (tmp_path / "tests.txt").read_text()
    )
