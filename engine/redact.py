"""Secrets in what the engine shows and writes: masked, never copied.

A storage URL such as ``postgresql://user:secret@host/db`` carries its password. Wherever such a
text is printed, logged, written to a file or TensorBoard, or put on a process's command line
(which every local user can read in ``ps``), the password is replaced by ``***``:
``postgresql://user:***@host/db``. The real value travels only in memory and, to the processes
that need it, through their environment (readable by the same user alone).

An interpolation such as ``${oc.env:DB_URL}`` is no secret: it is written as it is, unresolved.
"""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

MASK = "***"

# scheme://user:password@  (the password up to the last "@" before the host; it may hold ":")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<secret>[^\s/]*)@")
# ...?password=...&sslpassword=...&token=...  in a URL's query string
_QUERY = re.compile(
    r"(?P<head>[?&](?:password|passwd|pwd|sslpassword|token|access_token|secret)=)(?P<secret>[^&\s]*)",
    re.IGNORECASE,
)


def mask(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['head']}{MASK}@" if m["secret"] else m[0], text)
    return _QUERY.sub(lambda m: f"{m['head']}{MASK}" if m["secret"] else m[0], text)


def has_secret(text: str) -> bool:
    return mask(text) != text


def is_masked(text: str) -> bool:
    """Whether ``text`` is a URL whose secret was masked (and so cannot be used as it is)."""
    return f":{MASK}@" in text or re.search(rf"[?&][a-z_]+={re.escape(MASK)}", text) is not None


def scrub(config: DictConfig) -> DictConfig:
    """A copy of ``config`` with every secret-bearing string masked, interpolations unresolved.

    What a file, a launcher's job pickle or TensorBoard gets instead of the config itself.
    """
    plain = OmegaConf.to_container(config, resolve=False)
    changes = [(path, mask(value)) for path, value in _strings(plain) if has_secret(value)]
    if not changes:
        return config
    clean = copy.deepcopy(config)
    for path, value in changes:
        node: Any = clean
        for part in path[:-1]:
            node = node[part]
        opened = open_dict(node) if isinstance(node, DictConfig) else contextlib.nullcontext()
        with read_write(node), opened:
            node[path[-1]] = value
    return clean


def _strings(node: Any, path: tuple = ()):
    """(path, value) of every string leaf of a plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _strings(value, (*path, i))
    elif isinstance(node, str):
        yield path, node
