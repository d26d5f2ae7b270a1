"""The evaluation's command line: ``key=value`` arguments, as Hydra overrides are written, parsed
onto a typed schema so a misspelt key or a wrong type is refused with the closest valid key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from engine.config import ConfigError
from engine.keyvalue import parse as parse_key_values

SPLITS = ("test", "val", "train")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EvalSettings:
    group_by: str | None = None
    """A CSV column (not a feature: its values are the groups) or a feature (bucketed)."""
    min_group_size: int = 30
    """Groups with fewer rows are listed as too small instead of scored."""
    group_bins: int = 4
    """A feature used as group_by is cut into this many quantile bins."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32, 1024])
    device: str = "auto"
    latency: bool = True
    latency_warmup: int = 10
    latency_iters: int = 50
    batch_size: int = 1024
    """Rows per batch when running the model over the split."""


@dataclass
class EvalOptions:
    run: str = MISSING
    split: str = "test"
    checkpoint: str = "best"
    name: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of the run's own ``data`` config (``data.path=<csv>``: evaluate another file)."""
    eval: EvalSettings = field(default_factory=EvalSettings)


def parse(argv: list[str]) -> EvalOptions:
    """``EvalOptions`` from ``key=value`` arguments; a ``ConfigError`` names a bad one."""
    if not any(a.lstrip("+").startswith("run=") for a in argv):
        raise ConfigError("run=<run dir> is required: the folder a training run wrote.")
    options = parse_key_values(
        EvalOptions, argv, example="run=outputs/runs/<dir>", free_prefixes=("data.",)
    )
    if options.split not in SPLITS:
        raise ConfigError(f"split={options.split}: unknown split; use one of {', '.join(SPLITS)}.")
    if options.eval.device not in DEVICES:
        raise ConfigError(f"eval.device={options.eval.device}: use one of {', '.join(DEVICES)}.")
    if options.eval.min_group_size < 1 or options.eval.group_bins < 2:
        raise ConfigError("eval.min_group_size must be >= 1 and eval.group_bins >= 2.")
    if not options.eval.batch_sizes or min(options.eval.batch_sizes) < 1:
        raise ConfigError("eval.batch_sizes must list positive batch sizes, e.g. [1,32,1024].")
    return options
