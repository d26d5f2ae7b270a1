"""What ``model=`` names for serving, batch prediction and monitoring: a registered model
(``digits-mlp@production``, ``digits-mlp@3``) or a run dir (``outputs/runs/<dir>``).

Both load through ``engine.predictor`` (the registry's ``load`` for a version), so the server,
``engine.predict`` and ``engine.monitor`` see the same model and preprocessing as evaluation.
A source can also say, cheaply, whether what it names has changed since a load (an alias that
moved, a run dir whose checkpoint was rewritten): the server's live swap polls it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import datacard, predictor
from engine.config import ConfigError
from engine.registry import api, reference
from engine.registry.refs import MODEL_NAME

_NOT_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class RegistrySettings:
    """``registry.*`` of the commands that take ``model=``: where a registered model is."""

    storage: str | None = None
    """The registry database (a path or a URL without a password; else the environment
    variable ENGINE_REGISTRY_STORAGE, else outputs/registry.db)."""
    store: str | None = None
    """The registry's file store (else ENGINE_REGISTRY_STORE)."""


@dataclass
class LoadedModel:
    """A model ready to predict, and what names it."""

    predictor: predictor.Predictor
    name: str  # the registered name, or the run dir's folder name
    version: str  # the registry's version number, or the checkpoint's SHA-256 (12 digits)
    reference: dict[str, Any] | None  # reference.read()'s training rows; None: see reason
    reference_reason: str | None
    stamp: Any  # what ModelSource.changed compares against


@dataclass
class ModelSource:
    """``model=`` as given, and where the registry is (``registry.storage``/``.store``)."""

    spec: str
    checkpoint: str = "best"  # a run dir's checkpoint (best|last|<file>); versions have one
    storage: str | None = None
    store: str | None = None

    @property
    def run_dir(self) -> Path | None:
        """The run dir ``spec`` names, or None for a registry reference. A path (it holds a
        '/', or exists as a folder) is a run dir; anything else is a registered model."""
        path = Path(self.spec).expanduser()
        if "/" in self.spec or os.sep in self.spec or path.is_dir():
            if not path.is_dir():
                raise ConfigError(
                    f"model={self.spec}: no such run dir; pass a run dir a training run wrote, "
                    f"or a registered model such as digits-mlp@production."
                )
            return path.resolve()
        return None

    def describe(self) -> str:
        return f"run dir {self.run_dir}" if self.run_dir else f"registered model {self.spec}"

    def _run_stamp(self, run_dir: Path) -> tuple[int, int]:
        path = predictor.checkpoint_path(run_dir, self.checkpoint)
        stat = path.stat()
        return stat.st_mtime_ns, stat.st_size

    def stamp(self) -> Any:
        """A cheap token of what the source names now (a version number, a file's state)."""
        run_dir = self.run_dir
        if run_dir is not None:
            return self._run_stamp(run_dir)
        return api.resolve(self.spec, self.storage, self.store).version

    def changed(self, loaded: LoadedModel) -> bool:
        return self.stamp() != loaded.stamp

    def load(
        self, device: str | torch.device = "cpu", *, with_reference: bool = True
    ) -> LoadedModel:
        """The model the source names now, with its reference sample for drift monitoring."""
        run_dir = self.run_dir
        if run_dir is not None:
            return self._load_run(run_dir, device, with_reference)
        with api.open_registry(self.storage, self.store) as reg:
            version = api.db.resolve(reg.engine, api.parse(self.spec))
            model = api.load_version(reg, version, device)
            sample, reason = None, None
            if with_reference:
                if api.lineage.REFERENCE in version.files:
                    sample = reference.read(api._file(reg, version, api.lineage.REFERENCE))
                else:
                    reason = (version.lineage.get("reference") or {}).get(
                        "reason", "it was registered without one"
                    )
        return LoadedModel(
            model, version.name, str(version.version), sample, reason, version.version
        )

    def _load_run(
        self, run_dir: Path, device: str | torch.device, with_reference: bool
    ) -> LoadedModel:
        stamp = self._run_stamp(run_dir)
        model = predictor.load_run(run_dir, self.checkpoint, device)
        sample, reason = None, None
        if with_reference:
            card = datacard.read(run_dir) or {}
            sample, about = reference.sample(model.cfg, card.get("fingerprint"))
            reason = about.get("reason")
        name = _NOT_NAME.sub("-", run_dir.name).strip("-._") or "model"
        if not MODEL_NAME.fullmatch(name):
            name = f"run-{name}"
        return LoadedModel(
            model, name, datacard.file_sha256(model.checkpoint)[:12], sample, reason, stamp
        )
