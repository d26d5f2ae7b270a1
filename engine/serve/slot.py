"""The model being served, and its live swap to a new version.

``Served`` is one loaded version with what serving keeps about it: its drift reference (from its
training rows) and the window of recent inputs and predictions. ``ModelSlot`` holds the current
one. A new version is loaded, its reference built and the model warmed up beside the serving one
(in another thread); only then does the slot point at it, in one assignment that happens between
two batches: a batch runs entirely on the version it started with, and every answer names that
version. A failed load leaves the old version serving.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine import preprocess
from engine.model_source import LoadedModel, ModelSource
from engine.monitor import DriftReport, Reference, Window, compare
from engine.monitor.options import MonitorSettings

log = logging.getLogger("engine.serve")


@dataclass
class BatchResult:
    """A batch's answers, rows in request order."""

    served: Served
    labels: list[str] | None
    probabilities: np.ndarray | None  # [n, C] float32
    confidence: np.ndarray | None  # [n]
    class_index: np.ndarray | None  # [n] int64
    values: np.ndarray | None  # regression [n], target units


@dataclass
class Served:
    loaded: LoadedModel
    name: str
    reference: Reference | None
    window: Window

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def predictor(self):
        return self.loaded.predictor

    @property
    def feature_names(self) -> list[str]:
        return self.loaded.predictor.feature_names

    @property
    def task(self) -> str:
        return self.loaded.predictor.info.task

    @property
    def class_names(self) -> list[str]:
        info = self.loaded.predictor.info
        return list(info.class_names or [str(i) for i in range(info.num_classes)])

    def run(self, x_raw: np.ndarray, record: bool = True) -> BatchResult:
        """The model once over raw rows [n, F]; in the model thread."""
        p = self.loaded.predictor
        x = torch.from_numpy(preprocess.standardize(x_raw.astype(np.float32), p.info))
        decoded = p.decode(p.outputs(x))
        if self.task == "regression":
            result = BatchResult(self, None, None, None, None, decoded.outputs)
            predicted, confidence = decoded.outputs, None
        else:
            result = BatchResult(
                self,
                decoded.labels,
                decoded.probabilities,
                decoded.confidence,
                decoded.class_index,
                None,
            )
            predicted, confidence = decoded.class_index, decoded.confidence
        if record:
            self.window.add(x_raw.astype(np.float32), predicted, confidence)
        return result

    def drift(self, settings: MonitorSettings) -> DriftReport | None:
        if self.reference is None:
            return None
        x, predicted, confidence = self.window.snapshot()
        return compare(
            self.reference,
            x,
            predicted,
            confidence,
            p_value=settings.p_value,
            min_rows=settings.min_rows,
        )


def build(
    source: ModelSource, device: torch.device, name: str | None, monitor: MonitorSettings
) -> Served:
    """Load what the source names now, build its drift reference and warm it up."""
    loaded = source.load(device, with_reference=True)
    p = loaded.predictor
    if p.info.task == "lm":
        from engine.config import ConfigError

        raise ConfigError(
            f"model={source.spec}: a language model cannot be served by engine.serve (it serves "
            f"classification and regression models on tabular rows)."
        )
    reference = None
    if loaded.reference is not None:
        reference = Reference.build(loaded.reference, p, max_categories=monitor.max_categories)
    else:
        log.warning(
            "%s version %s has no reference sample (%s): drift is not monitored",
            loaded.name,
            loaded.version,
            loaded.reference_reason,
        )
    served = Served(
        loaded, name or loaded.name, reference, Window(monitor.window, len(p.feature_names))
    )
    served.run(np.zeros((1, len(p.feature_names)), np.float32), record=False)  # warm-up
    return served


class ModelSlot:
    def __init__(
        self,
        source: ModelSource,
        device: torch.device,
        name: str | None,
        monitor: MonitorSettings,
        first: Served,
        on_swap: Callable[[Served, Served], None] | None = None,
    ):
        self.source = source
        self.device = device
        self.name = name
        self.monitor = monitor
        self.current = first
        self._on_swap = on_swap
        self._lock = asyncio.Lock()

    async def reload(self, force: bool = False) -> tuple[bool, str]:
        """Swap to what the source names now if it changed (or always, with ``force``);
        (whether it swapped, the version serving before)."""
        async with self._lock:  # one reload at a time; a second caller waits for the first
            old = self.current
            if not force:
                changed = await asyncio.to_thread(self.source.changed, old.loaded)
                if not changed:
                    return False, old.version
            new = await asyncio.to_thread(build, self.source, self.device, self.name, self.monitor)
            if new.name != old.name:
                new.name = old.name  # the URL clients call does not change under them
            self.current = new
            if self._on_swap is not None:
                self._on_swap(old, new)
            log.info("swapped %s version %s -> %s", new.name, old.version, new.version)
            return True, old.version

    async def watch(self, every_s: float, on_failure: Callable[[Exception], None]) -> None:
        """Poll the source and swap when it changed, until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # a bad new version must not stop the one serving
                on_failure(err)
