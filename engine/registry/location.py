"""Where the registry is: its database URL and its file store.

The database: ``--storage`` (or ``registry.storage=``) on the command line, else the environment
variable ``ENGINE_REGISTRY_STORAGE``, else an SQLite file ``outputs/registry.db`` under the
current folder. A plain path means an SQLite file. A URL that carries a password is taken from
the environment variable only: a process's arguments are readable by every local user (``ps``),
its environment by the same user alone. The URL is never written anywhere, and shown masked.

The store: ``--store`` (or ``registry.store=``), else ``ENGINE_REGISTRY_STORE``, else the folder
``registry/`` beside an SQLite file (``outputs/registry/``), or ``outputs/registry/`` under the
current folder for a database server (a team points ``--store`` at a folder all of it reads).
Each version records the store it was registered into, and loading it reads from there unless
told otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from engine.redact import has_secret, mask
from engine.registry.refs import RegistryError

STORAGE_ENV = "ENGINE_REGISTRY_STORAGE"
STORE_ENV = "ENGINE_REGISTRY_STORE"
DEFAULT_DB = Path("outputs") / "registry.db"
DEFAULT_STORE = Path("outputs") / "registry"


def _as_url(text: str) -> str:
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def storage_url(given: str | None) -> str:
    """The database URL from an argument (no passwords), the environment, or the default."""
    if given:
        if has_secret(given):
            raise RegistryError(
                f"registry storage {mask(given)}: a URL with a password is refused as an "
                f"argument (--storage, registry.storage=), since every user of this machine can "
                f"read a process's arguments. Put it in the environment variable {STORAGE_ENV} "
                f"and leave the argument out."
            )
        return _as_url(given)
    env = (os.environ.get(STORAGE_ENV) or "").strip()  # a Secret's file may end in a newline
    return _as_url(env) if env else _as_url(str(DEFAULT_DB))


def _sqlite_file(url: str) -> Path | None:
    try:
        parsed = make_url(url)
    except sa.exc.ArgumentError as err:
        raise RegistryError(
            f"registry storage {mask(url)} is not a database URL ({err}); use e.g. "
            f"sqlite:///outputs/registry.db or postgresql://user@host/db."
        ) from err
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).expanduser().resolve()


def store_root(given: str | None, url: str) -> Path:
    """The store folder for new versions."""
    chosen = given or (os.environ.get(STORE_ENV) or "").strip()
    if chosen:
        return Path(chosen).expanduser().resolve()
    db_file = _sqlite_file(url)
    return db_file.parent / "registry" if db_file else DEFAULT_STORE.resolve()


def explicit_store(given: str | None) -> Path | None:
    """A store the user named (argument or environment) to read versions from, if any."""
    chosen = given or (os.environ.get(STORE_ENV) or "").strip()
    return Path(chosen).expanduser().resolve() if chosen else None


def open_database(url: str) -> sa.Engine:
    """The registry's database; one that cannot be opened is a RegistryError, password masked."""
    import engine.registry.db as db

    _sqlite_file(url)  # a malformed URL is named as such
    try:
        return db.connect(url)
    except Exception as err:  # SQLAlchemy's and the drivers' many types, OSError, ImportError
        from engine.search.console import first_line

        raise RegistryError(
            f"registry storage {mask(url)} could not be opened: {mask(first_line(err))}. Check the URL (scheme, "
            f"host, port, user, password, database) and that the server is reachable, or leave "
            f"--storage and {STORAGE_ENV} unset for the SQLite file {DEFAULT_DB}."
        ) from err
