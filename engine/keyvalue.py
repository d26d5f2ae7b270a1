"""The ``key=value`` command lines of the after-training tools (evaluate, serve, predict,
monitor): arguments written as Hydra overrides, merged onto a typed dataclass schema, so a
misspelt key or a wrong type is refused with the closest valid key named."""

from __future__ import annotations

import difflib
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.config import ConfigError

T = TypeVar("T")


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every key of a structured schema, nested ones dotted (``serve.port``)."""

    def walk(node: Any, prefix: str) -> list[str]:
        out = []
        for name, value in node.items():
            key = f"{prefix}{name}"
            out.append(key)
            if isinstance(value, dict):
                out.extend(walk(value, key + "."))
        return out

    tree = OmegaConf.to_container(OmegaConf.structured(schema), throw_on_missing=False)
    return walk(tree, prefix)


def suggest(key: str, valid: list[str]) -> str:
    """`` (did you mean <closest>?)``, or nothing when no valid key is close."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def parse(
    schema: type[T],
    argv: list[str],
    *,
    example: str,
    free_prefixes: tuple[str, ...] = (),
) -> T:
    """An instance of ``schema`` from ``key=value`` arguments. ``example`` is shown when an
    argument is not ``key=value``; keys under ``free_prefixes`` (e.g. ``data.``) are not
    checked against the schema (they override a run's own config). A bad argument is a
    ``ConfigError`` naming it."""
    valid = schema_keys(schema)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"'{arg}': arguments are key=value, e.g. {example}.")
        key = arg.split("=", 1)[0].lstrip("+")
        if not key.startswith(free_prefixes) and key not in valid:
            raise ConfigError(
                f"unknown key '{key}'{suggest(key, valid)}. Keys: {', '.join(valid)}."
            )
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(schema), OmegaConf.from_dotlist([a.lstrip("+") for a in argv])
        )
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", None) or "argument")
        hint = "" if key in valid else suggest(key, valid)
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}{hint}") from err
    for key in valid:
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{key}=... is required, e.g. {example}.")
    return OmegaConf.to_object(cfg)
