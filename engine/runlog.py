"""A run's own ``train.log`` beside the process's: a sweep's trial and a cross-validation fold
run inside a process whose log (the console, the sweep's or the CV run's train.log) goes on, and
each also keeps every line logged while it runs in a file of its own run dir."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def also_log_to(path: Path, formatter: logging.Formatter) -> Iterator[None]:
    """Everything logged (root logger) inside the block also goes to ``path``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(formatter)
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
