"""How a registered model is named: ``name``, ``name@<version>``, ``name@<alias>``.

``digits-mlp`` and ``digits-mlp@latest`` mean the newest version that was not deleted;
``digits-mlp@3`` version 3; ``digits-mlp@production`` whichever version the alias points at.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.config import ConfigError

LATEST = "latest"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ALIAS_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or a digit"
_ALIAS_RULE = "lower-case letters, digits, '_' and '-', starting with a letter"


class RegistryError(ConfigError):
    """A registry request that cannot be done as asked; the message names what and how to fix."""


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None  # a version number, or
    alias: str | None = None  # an alias; neither: the latest version

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def check_name(name: str) -> str:
    if not MODEL_NAME.fullmatch(name or "") or len(name) > 200:
        raise RegistryError(
            f"model name {name!r} is not allowed: use {_NAME_RULE} (at most 200), e.g. "
            f"--name digits-mlp."
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_NAME.fullmatch(alias or "") or len(alias) > 64:
        raise RegistryError(
            f"alias {alias!r} is not allowed: use {_ALIAS_RULE} (at most 64), e.g. --alias "
            f"production or --alias staging."
        )
    if alias == LATEST:
        raise RegistryError(
            f"alias {LATEST!r} is reserved: it always means the newest version. Choose another "
            f"name, e.g. --alias production."
        )
    return alias


def parse(text: str) -> Ref:
    """``name``, ``name@N``, ``name@alias`` or ``name@latest``; anything else is refused."""
    name, at, selector = str(text).partition("@")
    if not MODEL_NAME.fullmatch(name) or (at and not selector) or "@" in selector:
        raise RegistryError(
            f"{text!r} is not a model reference: write <name>, <name>@<version> or "
            f"<name>@<alias>, e.g. digits-mlp@3 or digits-mlp@production."
        )
    if not at or selector == LATEST:
        return Ref(name)
    if selector.isdigit():
        if int(selector) < 1:
            raise RegistryError(f"{text!r}: version numbers start at 1, e.g. {name}@1.")
        return Ref(name, version=int(selector))
    if not ALIAS_NAME.fullmatch(selector):
        raise RegistryError(
            f"{text!r}: {selector!r} is neither a version number nor an alias ({_ALIAS_RULE}); "
            f"e.g. {name}@3 or {name}@production."
        )
    return Ref(name, alias=selector)
