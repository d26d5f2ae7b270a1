"""Search spaces: Hydra's sweep grammar -> Optuna distributions, and grid expansion.

A space comes from two places, merged in this order: ``search.params`` of the preset
(``{"optim.lr": "tag(log, interval(1e-4, 1e-1))"}``) and the sweep overrides of the command line
(``'model.hidden=choice(64,128)'``, ``model=choice(mlp,cnn)``, ``a=1,2,3``). A command-line sweep
replaces the preset's entry for the same key; a plain command-line value (``optim.lr=1e-3``) fixes
the key and removes it from the space.

Grammar -> distribution:

- ``choice(a,b,...)``, ``a,b,...``, ``shuffle(...)``: categorical (config-group choices included).
- ``range(start, stop[, step])``: Python's range (stop excluded): an int (or stepped float)
  distribution, or the listed values for grid.
- ``interval(a, b)``: float uniform; int uniform when the key's config value is an int or with
  ``tag(int, ...)``; ``tag(log, ...)`` samples log-uniformly.

A :class:`Param` is plain data (JSON round trip), so workers on other machines rebuild the space
from the study's storage.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from omegaconf import DictConfig, OmegaConf

from engine.config import ConfigError

Primitive = str | int | float | bool | None


@dataclass
class Param:
    """One dimension of the space. ``key`` is the override key (``+`` prefix kept)."""

    name: str
    key: str
    kind: str  # "choice" | "int" | "float"
    choices: list[Primitive] = field(default_factory=list)  # choice: the values Optuna stores
    strings: list[str] = field(default_factory=list)  # choice: the same, as override text
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    source: str = ""  # the grammar it came from, for messages and the summary

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.kind == "int":
            step = int(self.step or 1)
            return optuna.distributions.IntDistribution(
                int(self.low), int(self.high), log=self.log, step=step
            )
        return optuna.distributions.FloatDistribution(
            self.low, self.high, log=self.log, step=self.step
        )

    def suggest(self, trial: optuna.Trial) -> Primitive:
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, self.choices)
        if self.kind == "int":
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list[Primitive]:
        """Every value, for grid; only discrete params have them."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step is not None:
            n = int(round((self.high - self.low) / self.step))
            return [_tidy(self.low + i * self.step) for i in range(n + 1)]
        raise ConfigError(
            f"search space key {self.name}={self.source} is continuous; search=grid needs every "
            f"value listed: use choice(...) or range(...)."
        )

    def to_override(self, value: Primitive) -> str:
        """The command-line override that sets this param to ``value``."""
        if self.kind == "choice":
            text = self.strings[self.choices.index(value)]
        elif isinstance(value, float):
            text = repr(_tidy(value))
        else:
            text = str(value)
        return f"{self.key}={text}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Param:
        return cls(**data)


def _tidy(x: float) -> float:
    """0.30000000000000004 -> 0.3: floats built by adding steps, shown as a user would write them."""
    return float(f"{x:.12g}")


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _is_int_key(base: DictConfig | None, key: str) -> bool:
    if base is None:
        return False
    try:
        value = OmegaConf.select(base, key, throw_on_missing=False)
    except Exception:
        return False
    return isinstance(value, int) and not isinstance(value, bool)


def _param_from_override(ov: Override, base: DictConfig | None) -> Param:
    key = ov.get_key_element()
    name = key.lstrip("+~")
    source = ov.input_line.split("=", 1)[1] if ov.input_line else ""
    sweep = ov.value()
    where = f"search space key {name}={source}"
    if isinstance(sweep, ChoiceSweep):
        strings = list(ov.sweep_string_iterator()) if not sweep.shuffle else None
        if strings is None:  # shuffle() lists its values in random order; keep the given order
            strings = [str(v) for v in sweep.list]
        values = list(sweep.list)
        if not values:
            raise ConfigError(f"{where} is empty: give at least one value.")
        choices = values if all(_primitive(v) for v in values) else strings
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where} lists a value twice.")
        return Param(name, key, "choice", choices=choices, strings=strings, source=source)
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if step == 0 or (stop - start) / step <= 0:
            raise ConfigError(f"{where} is empty: range(start, stop, step) excludes stop.")
        n = math.ceil((stop - start) / step - 1e-9)
        last = start + (n - 1) * step
        if step < 0:
            start, last, step = last, start, -step
        log = "log" in sweep.tags
        if all(isinstance(v, int) for v in (start, stop, step)):
            return Param(name, key, "int", low=start, high=last, step=step, log=log, source=source)
        return Param(
            name, key, "float", low=float(start), high=_tidy(last), step=float(step), source=source
        )
    if isinstance(sweep, IntervalSweep):
        low, high = float(sweep.start), float(sweep.end)
        if not low < high:
            raise ConfigError(f"{where} is empty: interval(a, b) needs a < b.")
        log = "log" in sweep.tags
        if log and low <= 0:
            raise ConfigError(f"{where}: a log interval needs a > 0.")
        if "int" in sweep.tags or _is_int_key(base, name):
            if low != int(low) or high != int(high):
                raise ConfigError(f"{where}: {name} is an integer; give integer bounds.")
            return Param(name, key, "int", low=int(low), high=int(high), log=log, source=source)
        return Param(name, key, "float", low=low, high=high, log=log, source=source)
    raise ConfigError(f"{where}: unsupported sweep {type(sweep).__name__}.")


def parse_space(
    arguments: list[str], preset: dict[str, str] | None, base: DictConfig | None = None
) -> tuple[dict[str, Param], list[str]]:
    """Split command-line ``arguments`` into the space and the fixed overrides of every trial.

    Returns ``(space, fixed)``: ``space`` maps a param name to its :class:`Param`, in the order
    preset-then-command-line; ``fixed`` keeps the non-sweep overrides in their order. Raises
    :class:`ConfigError` naming the key for malformed or empty entries, or an empty space.
    """
    parser = OverridesParser.create()
    space: dict[str, Param] = {}
    for key, text in (preset or {}).items():
        try:
            (ov,) = parser.parse_overrides([f"{key}={text}"])
        except Exception as err:
            raise ConfigError(
                f"search.params: {key}={text!r} is not Hydra sweep grammar ({_first_line(err)}); "
                f"use e.g. choice(a,b), range(1,10), interval(0,1), tag(log, interval(1e-4,1e-1))."
            ) from err
        if not ov.is_sweep_override():
            raise ConfigError(
                f"search.params: {key}={text!r} is one value, not a sweep; fix it with a plain "
                f"override ({key}={text}) or give choice(...)/range(...)/interval(...)."
            )
        space[ov.get_key_element().lstrip("+~")] = _param_from_override(ov, base)
    fixed: list[str] = []
    try:
        overrides = parser.parse_overrides(list(arguments))
    except Exception as err:
        raise ConfigError(f"could not parse the overrides: {_first_line(err)}") from err
    for ov in overrides:
        name = ov.get_key_element().lstrip("+~")
        if ov.is_sweep_override():
            if name.startswith(("search", "hydra")) or ov.is_hydra_override():
                raise ConfigError(
                    f"cannot sweep over {name} ({ov.input_line}): the sweep's own settings take "
                    f"one value."
                )
            space.pop(name, None)  # the command line wins, and goes last
            space[name] = _param_from_override(ov, base)
        else:
            space.pop(name, None)
            fixed.append(ov.input_line)
    if not space:
        raise ConfigError(
            "the search space is empty: set search.params in the preset or give sweep overrides "
            "such as 'optim.lr=tag(log, interval(1e-4, 1e-1))' or 'model.hidden=choice(64,128)'."
        )
    return space, fixed


def grid(space: dict[str, Param]) -> list[dict[str, Primitive]]:
    """Every combination of the (discrete) space, in a fixed order."""
    names = list(space)
    product = itertools.product(*(space[n].values() for n in names))
    return [dict(zip(names, combo)) for combo in product]


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
