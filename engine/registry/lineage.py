"""What a registered version records about where it came from, read from its run dir.

The lineage: the resolved config, the data card's fingerprint of the training rows, the final
metrics (``metrics.json``) and the evaluation metrics (``eval/<name>/eval.json``, scalars only),
the checkpoint's SHA-256, the project's git commit and whether its tree had uncommitted changes,
what the run was initialised from (``trainer.init_from``), who registered it and when (UTC).

The files: what predicting needs (the checkpoint, the config, ``data_info.json``, ``vocab.json``
of a text run) and the data card, by the name each has in a version.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

import engine.registry.db as db
from engine import datacard, predictor, redact
from engine.registry.refs import RegistryError
from engine.task import Task, resolve_monitor

CHECKPOINT, CONFIG, DATA_INFO, VOCAB = (
    "checkpoint.pt",
    "config.yaml",
    "data_info.json",
    "vocab.json",
)
REFERENCE = "reference.pt"


def git_state(folder: Path) -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``; None outside one."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": bool(status and status.strip())}


def project_git(run_dir: Path) -> dict[str, Any] | None:
    """The run dir's project (a run dir under the project's outputs/), else the current one's."""
    return git_state(run_dir) or git_state(Path.cwd())


def scalars(node: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested JSON value, keyed by its path (``per_class/3/f1``)."""
    out: dict[str, float] = {}
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        if isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            out[prefix] = node
        return out
    for key, value in items:
        out.update(scalars(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def eval_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{<evaluation name>: {metric: value}}`` from ``eval/*/eval.json``."""
    found = {}
    for path in sorted(Path(run_dir).glob("eval/*/eval.json")):
        try:
            found[path.parent.name] = scalars(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a half-written or foreign file: the evaluation can be run again
    return found


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RegistryError(
            f"{run_dir} has no metrics.json: the run did not finish. Register a run that "
            f"completed (or finish it: re-running the same command resumes it)."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise RegistryError(f"{path} is not valid JSON ({err}); train the run again.") from err


def monitored(cfg: Any, info: Any) -> str:
    """The metric the run chose its best checkpoint by (``trainer.monitor``, auto resolved)."""
    t = cfg.trainer
    return resolve_monitor(str(t.monitor), str(t.monitor_mode), Task.of(info))[0]


def collect(run_dir: Path, checkpoint: str = "best") -> tuple[dict[str, Any], dict[str, Path]]:
    """(lineage, {file name in the version: path}) of a run dir; a run dir that cannot be
    registered (no config, no metrics, no checkpoint) is a RegistryError naming what it lacks."""
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise RegistryError(f"{run_dir}: no such folder; pass the run dir of a training run.")
    cfg = predictor.run_config(run_dir)
    info = predictor.run_info(run_dir)  # a missing one is named now, not at load time
    metrics = _final_metrics(run_dir)
    ckpt_path = predictor.checkpoint_path(run_dir, checkpoint)
    files = {CHECKPOINT: ckpt_path, DATA_INFO: run_dir / "data_info.json"}
    for name in (VOCAB, datacard.CARD_JSON, datacard.CARD_MD):
        if (run_dir / name).is_file():
            files[name] = run_dir / name
    card = datacard.read(run_dir)
    lineage = {
        "run_dir": str(run_dir),
        "checkpoint": {
            "which": checkpoint,
            "sha256": datacard.file_sha256(ckpt_path),
            "bytes": ckpt_path.stat().st_size,
        },
        "config": OmegaConf.to_container(redact.scrub(cfg), resolve=False),
        "data_fingerprint": card.get("fingerprint") if card else None,
        "task": info.task,
        "monitor": monitored(cfg, info),
        "metrics": metrics,
        "eval": eval_metrics(run_dir),
        "git": project_git(run_dir),
        "init_from": OmegaConf.select(cfg, "trainer.init_from", default=None),
        "created_by": db.user(),
        "created_at": db.now(),
    }
    return lineage, files


def config_text(lineage: dict[str, Any]) -> bytes:
    """The config file a version stores: the run's config, any secret in it masked."""
    return OmegaConf.to_yaml(OmegaConf.create(lineage["config"])).encode()
