"""The drift monitor's settings (``monitor.*``, shared with the server's command line) and the
offline report's command line: ``key=value`` arguments parsed onto a typed schema."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from engine.config import ConfigError
from engine.keyvalue import parse as parse_key_values
from engine.model_source import RegistrySettings

EXAMPLE = "model=digits-mlp@production input=predictions.jsonl"


@dataclass
class MonitorSettings:
    """``monitor.*``: what the drift report covers and when it alarms."""

    window: int = 1000
    """Rows the report covers: the last ``window`` predicted rows. The server keeps them in a
    sliding window of this capacity (it must be >= 1 there). Offline, ``python -m
    engine.monitor`` defaults to 0, meaning every row of its input."""
    p_value: float = 0.05
    """The family-wise false-alarm rate: a feature alarms below ``p_value / features``
    (Bonferroni); the predictions' own test alarms below ``p_value``."""
    max_categories: int = 20
    """A feature whose reference values are all integers with at most this many distinct ones
    is categorical (chi-square test), any other numeric (Kolmogorov-Smirnov)."""
    min_rows: int = 30
    """Below this many rows in the window no test is run and nothing alarms."""

    def check(self, *, all_rows_ok: bool = False) -> MonitorSettings:
        """Refuse settings that cannot work (a ``ConfigError`` naming the key).
        ``all_rows_ok``: ``window=0`` (every row) is allowed, offline only."""
        if self.window < (0 if all_rows_ok else 1):
            raise ConfigError(
                f"monitor.window={self.window}: "
                + ("use 0 (every row) or a number of rows." if all_rows_ok
                   else "the sliding window holds at least 1 row, e.g. monitor.window=1000.")
            )  # fmt: skip
        if not 0.0 < self.p_value < 1.0:
            raise ConfigError(f"monitor.p_value={self.p_value}: use a probability, e.g. 0.05.")
        if self.max_categories < 2:
            raise ConfigError(f"monitor.max_categories={self.max_categories}: use 2 or more.")
        if self.min_rows < 1:
            raise ConfigError(f"monitor.min_rows={self.min_rows}: use 1 or more, e.g. 30.")
        return self


@dataclass
class MonitorOptions:
    model: str = MISSING
    """A registered model (``digits-mlp@production``) or a run dir."""
    input: str = MISSING
    """A CSV of raw rows (training column names) or a prediction log (``.jsonl``)."""
    checkpoint: str = "best"
    output: str | None = None
    """Where to write the report as JSON (atomically)."""
    fail_on_drift: bool = False
    """Exit with code 3 when something alarms (for CI and cron jobs)."""
    monitor: MonitorSettings = field(default_factory=lambda: MonitorSettings(window=0))
    registry: RegistrySettings = field(default_factory=RegistrySettings)


def parse(argv: list[str]) -> MonitorOptions:
    """``MonitorOptions`` from ``key=value`` arguments; a ``ConfigError`` names a bad one."""
    for key, what in (("model", "a registered model or a run dir"), ("input", "a CSV or a log")):
        if not any(a.lstrip("+").startswith(f"{key}=") for a in argv):
            raise ConfigError(f"{key}=... is required ({what}), e.g. {EXAMPLE}.")
    options = parse_key_values(MonitorOptions, argv, example=EXAMPLE)
    options.monitor.check(all_rows_ok=True)
    return options
