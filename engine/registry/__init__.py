"""The model registry: versions of trained models, their lineage, aliases (``@production``),
and one call that loads a registered model ready to predict on raw rows.

    python -m engine.registry register <run dir> --name digits-mlp
    python -m engine.registry promote digits-mlp@3 --alias production

    from engine.registry import load
    model = load("digits-mlp@production")       # an engine.predictor.Predictor
    model.predict(frame).labels

refs.py       names and references (name@3, name@production)
store.py      the content-addressed file store
db.py         the tables and the transactions (SQLite, PostgreSQL)
lineage.py    what a version records about its run
reference.py  the reference sample of training rows, for drift monitoring
location.py   where the database and the store are
api.py        the operations as Python calls; cli.py the command line
"""

from engine.registry.api import load, reference_sample, resolve
from engine.registry.refs import RegistryError

__all__ = ["RegistryError", "load", "reference_sample", "resolve"]
