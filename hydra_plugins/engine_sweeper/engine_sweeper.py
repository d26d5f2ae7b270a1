"""The Hydra glue of ``python -m engine.train -m search=<preset>``: everything is in engine.search.

Hydra 1.3 only instantiates a sweeper whose class lives under the ``hydra_plugins`` namespace
package, so this thin class lives here. Hydra imports every plugin module on each start: keep
this one free of heavy imports (torch, optuna); they load when a sweep actually runs.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class EngineSweeper(Sweeper):
    """Runs the sweep described by the config's ``search`` group (engine/search/driver.py)."""

    def __init__(self, **_: Any) -> None:
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        # The training task function is not kept: trials run in worker processes (or launcher
        # jobs running the sweep's own task function), never through Hydra's job of this process.
        self.config, self.hydra_context = config, hydra_context

    def sweep(self, arguments: list[str]) -> Any:
        from engine.search.driver import run_sweep

        assert self.config is not None
        return run_sweep(self.config, arguments, self.hydra_context)
