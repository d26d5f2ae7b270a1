"""What a worker needs to run a study's trials, kept in the study itself.

The driver writes a :class:`Spec` into the study's user attributes (key ``engine.spec``) each
time the sweep command runs; a worker (``python -m engine.search.worker --storage URL --study
NAME``) reads it back, on this machine or another one, and re-reads it between trials so a re-run
with a larger ``search.n_trials`` reaches workers that are already running.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from engine.search.space import Param

SPEC_ATTR = "engine.spec"


@dataclass
class Spec:
    sweep_dir: str
    """Where trial folders go (a worker on another machine may pass its own)."""
    config_dir: str
    """The primary config folder (conf/)."""
    config_name: str
    """The primary config (train)."""
    search_path: list[str] = field(default_factory=list)
    """Extra config folders (``--config-dir``), as ``file://`` search-path entries."""
    fixed: list[str] = field(default_factory=list)
    """Overrides every trial gets (the command line's non-sweep overrides)."""
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Param name -> :class:`Param` as a dict."""
    sampler: str = "tpe"
    seed: int = 0
    n_trials: int = 20
    pruner: str = "none"
    max_epochs: int | None = None
    """trainer.max_epochs when every trial has the same (the hyperband budget)."""
    metrics: list[str] = field(default_factory=lambda: ["val/acc"])
    directions: list[str] = field(default_factory=lambda: ["maximize"])
    max_failures: int = 10
    session: str = ""
    """ISO time at which this run of the sweep started (max_failures counts from there)."""
    metric_tags: list[str] = field(default_factory=list)
    """The run metrics the HPARAMS dashboard shows as columns."""
    subdir: str = "trial_{number}"
    """Trial folder name under the sweep dir, with ``{number}`` the Optuna trial number."""
    wilcoxon_p_threshold: float = 0.1
    """``search.wilcoxon_p_threshold``, for ``pruner=wilcoxon``."""
    gpus_per_trial: int = 1
    """DDP ranks per trial (``search.gpus_per_trial``); 1: the trial runs in the worker itself.
    A study stored before this field existed reads back as 1."""

    def params(self) -> dict[str, Param]:
        return {name: Param.from_dict(p) for name, p in self.space.items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))
