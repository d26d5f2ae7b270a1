"""The registry's operations as Python calls: what the command line and a sweep run, and what
the serving code imports (``load``, ``resolve``, ``reference_sample``)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch
from omegaconf import OmegaConf

import engine.registry.db as db
import engine.registry.lineage as lineage
import engine.registry.location as location
import engine.registry.reference as reference
from engine import predictor
from engine.dataset import DataInfo
from engine.registry.refs import Ref, RegistryError, check_name, parse
from engine.registry.store import Store


@dataclass
class Registry:
    """An opened registry: its database and the store new versions go into."""

    engine: sa.Engine
    url: str  # may hold a password: never shown unmasked, never written
    store: Store
    read_store: Store | None  # a store named by the user, read instead of a version's own

    def store_of(self, version: db.Version) -> Store:
        return self.read_store or Store(Path(version.store))

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.dispose()  # a server's connections close now, not whenever GC runs


def open_registry(storage: str | None = None, store: str | None = None) -> Registry:
    url = location.storage_url(storage)
    engine = location.open_database(url)
    explicit = location.explicit_store(store)
    return Registry(
        engine, url, Store(location.store_root(store, url)), Store(explicit) if explicit else None
    )


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def register(reg: Registry, run_dir: Path, name: str, checkpoint: str = "best") -> db.Version:
    """Copy a run dir's model into the store and record it as the next version of ``name``."""
    check_name(name)
    record, paths = lineage.collect(Path(run_dir), checkpoint)
    files = {item: reg.store.put_file(path) for item, path in paths.items()}
    if files[lineage.CHECKPOINT] != record["checkpoint"]["sha256"]:
        raise RegistryError(
            f"{paths[lineage.CHECKPOINT]} changed while it was being registered (a run still "
            f"training?); register it once the run has finished."
        )
    files[lineage.CONFIG] = reg.store.put_bytes(lineage.config_text(record))
    cfg = OmegaConf.create(record["config"])
    sample, about = reference.build(cfg, record["data_fingerprint"])
    if sample is None:
        warn(
            f"{name}: registered without a reference sample for drift monitoring: "
            f"{about['reason']}."
        )
    else:
        files[lineage.REFERENCE] = reg.store.put_bytes(sample)
    record["reference"] = about
    number = db.add_version(reg.engine, name, str(reg.store.root), files, record)
    return db.resolve(reg.engine, Ref(name, version=number))


def resolve(ref: str | Ref, storage: str | None = None, store: str | None = None) -> db.Version:
    """The version record a reference names (``digits-mlp@production``)."""
    with open_registry(storage, store) as reg:
        return db.resolve(reg.engine, parse(ref) if isinstance(ref, str) else ref)


def _file(reg: Registry, version: db.Version, item: str) -> Path:
    digest = version.files.get(item)
    if digest is None:
        raise RegistryError(f"{version.ref} has no {item} in the registry.")
    return reg.store_of(version).verified_path(digest, f"{item} of {version.ref}")


def load_version(reg: Registry, version: db.Version, device: str | torch.device) -> Any:
    """A ``Predictor`` from a version's stored files, each checked against its hash."""
    ckpt = _file(reg, version, lineage.CHECKPOINT)
    cfg = OmegaConf.load(_file(reg, version, lineage.CONFIG))
    info = DataInfo.from_json(json.loads(_file(reg, version, lineage.DATA_INFO).read_text()))
    if lineage.VOCAB in version.files:
        info.extra["vocab"] = json.loads(_file(reg, version, lineage.VOCAB).read_text())
    return predictor.load(cfg, info, ckpt, device)


def load(
    ref: str,
    device: str | torch.device = "cpu",
    storage: str | None = None,
    store: str | None = None,
) -> predictor.Predictor:
    """The registered model ``ref`` names, ready to predict on raw rows."""
    with open_registry(storage, store) as reg:
        return load_version(reg, db.resolve(reg.engine, parse(ref)), device)


def reference_sample(
    ref: str, storage: str | None = None, store: str | None = None
) -> dict[str, Any] | None:
    """The version's reference training rows (``engine.registry.reference.read``); None when
    it was registered without one (``lineage["reference"]["reason"]`` says why)."""
    with open_registry(storage, store) as reg:
        version = db.resolve(reg.engine, parse(ref))
        if lineage.REFERENCE not in version.files:
            return None
        return reference.read(_file(reg, version, lineage.REFERENCE))
