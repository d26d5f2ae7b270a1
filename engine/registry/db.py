"""The registry's tables and the transactions that change them (SQLAlchemy Core: SQLite or
PostgreSQL, or any database SQLAlchemy reaches).

Tables (prefixed ``registry_`` so they can share a database with an Optuna study):

- ``registry_models``: one row per model name; the row every change to that model locks first.
- ``registry_versions``: one row per version, ``(model, version)`` unique; the lineage and the
  store's file hashes as JSON. A deleted version keeps its row (state ``deleted``), so its number
  is never given out again.
- ``registry_aliases``: ``(model, alias) -> version``, a foreign key into the versions, so an
  alias can never point at a version that does not exist.
- ``registry_alias_events``: every move of an alias (promote, rollback), who and when; what
  ``rollback`` reads and ``show`` prints.

Concurrency. Each change is one transaction that first takes the model's row lock: on SQLite the
transaction starts with ``BEGIN IMMEDIATE`` (the database's write lock, waited for up to 60 s);
elsewhere ``SELECT ... FOR UPDATE`` on the model row. The next version number is read and
written under that lock, and an alias moves together with its history row. Should two writers
still collide (a model row created by both at once, a deadlock the server broke), the
transaction is rolled back whole and run again.
"""

from __future__ import annotations

import datetime as dt
import getpass
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from engine.registry.refs import Ref, RegistryError

T = TypeVar("T")
ATTEMPTS = 30
READY, DELETED = "ready", "deleted"
PROMOTE, ROLLBACK = "promote", "rollback"

metadata = sa.MetaData()
models = sa.Table(
    "registry_models",
    metadata,
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("created_at", sa.String(40), nullable=False),
)
versions = sa.Table(
    "registry_versions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), sa.ForeignKey("registry_models.name"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    sa.Column("deleted_at", sa.String(40)),
    sa.Column("store", sa.Text, nullable=False),
    sa.Column("files", sa.JSON, nullable=False),
    sa.Column("lineage", sa.JSON, nullable=False),
    sa.UniqueConstraint("model", "version", name="registry_versions_model_version"),
)
aliases = sa.Table(
    "registry_aliases",
    metadata,
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.ForeignKeyConstraint(
        ["model", "version"], ["registry_versions.model", "registry_versions.version"]
    ),
)
alias_events = sa.Table(
    "registry_alias_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(200), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("previous", sa.Integer),
    sa.Column("at", sa.String(40), nullable=False),
    sa.Column("by", sa.String(200), nullable=False),
)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container's numeric uid): still record something
        return "unknown"


@dataclass
class Version:
    """One registered version as read from the database."""

    name: str
    version: int
    state: str
    created_at: str
    created_by: str
    store: str
    files: dict[str, str]
    lineage: dict[str, Any]
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class AliasEvent:
    alias: str
    action: str
    version: int
    previous: int | None
    at: str
    by: str


# --------------------------------------------------------------------------------------------
# connecting


def _sqlite_immediate(engine: sa.Engine) -> None:
    """Make every SQLite transaction take the write lock at its start (``BEGIN IMMEDIATE``):
    a reader that later writes cannot then deadlock with another one, and the version number
    it read stays the latest until it commits. Foreign keys are on (SQLite's default is off)."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own BEGIN off: ours below
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def connect(url: str) -> sa.Engine:
    """An engine on ``url`` with the registry's tables created if missing."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 60})
        _sqlite_immediate(engine)
    else:
        from engine.search.storage import driver_url  # psycopg 3 or psycopg2, whichever is here

        engine = sa.create_engine(driver_url(url), pool_pre_ping=True)
    # Several processes may open a new registry at once: a table another one just created
    # fails this one's CREATE; it then finds the table on the next try.
    for attempt in range(5):
        try:
            metadata.create_all(engine)
            break
        except (IntegrityError, sa.exc.ProgrammingError, OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    return engine


def _retryable(err: DBAPIError) -> bool:
    if isinstance(err, IntegrityError):
        return True  # a rival created the same row first; the retry sees it
    text = str(err.orig).lower()
    return any(word in text for word in ("locked", "deadlock", "serialize", "busy"))


def transaction(engine: sa.Engine, work: Callable[[sa.Connection], T]) -> T:
    """Run ``work`` in one transaction; a collision with another writer runs it again."""
    for attempt in range(ATTEMPTS):
        try:
            with engine.begin() as conn:
                return work(conn)
        except DBAPIError as err:
            if attempt == ATTEMPTS - 1 or not _retryable(err):
                raise
            time.sleep(random.uniform(0.005, 0.03) * (attempt + 1))
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# reading


def _lock_model(conn: sa.Connection, name: str, create: bool = False) -> bool:
    """Take the model's row lock (creating the row when asked); False if there is no model."""
    query = sa.select(models.c.name).where(models.c.name == name).with_for_update()
    if conn.execute(query).first() is not None:
        return True
    if not create:
        return False
    conn.execute(sa.insert(models).values(name=name, created_at=now()))
    return conn.execute(query).first() is not None


def _no_model(conn: sa.Connection, name: str) -> RegistryError:
    known = [r.name for r in conn.execute(sa.select(models.c.name).order_by(models.c.name))]
    have = f"registered models: {', '.join(known)}" if known else "no model is registered yet"
    return RegistryError(
        f"no model named {name!r} in the registry ({have}). Register one with: python -m "
        f"engine.registry register <run dir> --name {name}"
    )


def _aliases_of(conn: sa.Connection, name: str) -> dict[str, int]:
    rows = conn.execute(
        sa.select(aliases.c.alias, aliases.c.version)
        .where(aliases.c.model == name)
        .order_by(aliases.c.alias)
    )
    return {r.alias: r.version for r in rows}


def _version(row: Any, alias_map: dict[str, int]) -> Version:
    return Version(
        row.model,
        row.version,
        row.state,
        row.created_at,
        row.created_by,
        row.store,
        dict(row.files),
        dict(row.lineage),
        [a for a, v in alias_map.items() if v == row.version],
    )


def _version_number(conn: sa.Connection, ref: Ref) -> int:
    """The version number ``ref`` names, checked to exist and not be deleted."""
    if not _has_model(conn, ref.name):
        raise _no_model(conn, ref.name)
    live = sa.select(sa.func.max(versions.c.version)).where(
        versions.c.model == ref.name, versions.c.state == READY
    )
    if ref.alias is not None:
        target = _aliases_of(conn, ref.name).get(ref.alias)
        if target is None:
            known = ", ".join(f"@{a}" for a in _aliases_of(conn, ref.name)) or "none yet"
            raise RegistryError(
                f"{ref}: model {ref.name!r} has no alias {ref.alias!r} (its aliases: {known}). "
                f"Set it with: python -m engine.registry promote {ref.name}@<version> --alias "
                f"{ref.alias}"
            )
        return target
    if ref.version is None:
        latest = conn.execute(live).scalar()
        if latest is None:
            raise RegistryError(f"{ref.name}: every version of it was deleted; register one.")
        return int(latest)
    state = conn.execute(
        sa.select(versions.c.state).where(
            versions.c.model == ref.name, versions.c.version == ref.version
        )
    ).scalar()
    if state is None or state == DELETED:
        latest = conn.execute(live).scalar()
        why = "was deleted" if state == DELETED else "does not exist"
        raise RegistryError(
            f"{ref}: version {ref.version} of {ref.name!r} {why} (latest: "
            f"{f'{ref.name}@{latest}' if latest else 'none'}). Run `python -m engine.registry "
            f"list` to see its versions."
        )
    return ref.version


def _has_model(conn: sa.Connection, name: str) -> bool:
    return conn.execute(sa.select(models.c.name).where(models.c.name == name)).first() is not None


def _read_version(conn: sa.Connection, name: str, number: int) -> Version:
    row = conn.execute(
        sa.select(versions).where(versions.c.model == name, versions.c.version == number)
    ).one()
    return _version(row, _aliases_of(conn, name))


def resolve(engine: sa.Engine, ref: Ref) -> Version:
    with engine.connect() as conn:
        return _read_version(conn, ref.name, _version_number(conn, ref))


def model_names(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return [r.name for r in conn.execute(sa.select(models.c.name).order_by(models.c.name))]


def model_versions(engine: sa.Engine, name: str, deleted: bool = False) -> list[Version]:
    with engine.connect() as conn:
        if not _has_model(conn, name):
            raise _no_model(conn, name)
        query = sa.select(versions).where(versions.c.model == name)
        if not deleted:
            query = query.where(versions.c.state == READY)
        alias_map = _aliases_of(conn, name)
        return [_version(r, alias_map) for r in conn.execute(query.order_by(versions.c.version))]


def history(engine: sa.Engine, name: str, alias: str | None = None) -> list[AliasEvent]:
    """The alias moves of a model (of one alias), oldest first."""
    query = sa.select(alias_events).where(alias_events.c.model == name)
    if alias is not None:
        query = query.where(alias_events.c.alias == alias)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(alias_events.c.id))
        return [AliasEvent(r.alias, r.action, r.version, r.previous, r.at, r.by) for r in rows]


# --------------------------------------------------------------------------------------------
# changing


def add_version(
    engine: sa.Engine, name: str, store: str, files: dict[str, str], lineage: dict[str, Any]
) -> int:
    """Record a new version of ``name`` (created on first use); return its number."""

    def work(conn: sa.Connection) -> int:
        _lock_model(conn, name, create=True)
        last = conn.execute(
            sa.select(sa.func.max(versions.c.version)).where(versions.c.model == name)
        ).scalar()
        number = int(last or 0) + 1
        conn.execute(
            sa.insert(versions).values(
                model=name,
                version=number,
                state=READY,
                created_at=lineage.get("created_at") or now(),
                created_by=lineage.get("created_by") or user(),
                store=store,
                files=files,
                lineage=lineage,
            )
        )
        return number

    return transaction(engine, work)


def _move_alias(
    conn: sa.Connection, name: str, alias: str, number: int, action: str, by: str
) -> int | None:
    """Point ``alias`` at ``number`` and record the move; return the version it left."""
    previous = _aliases_of(conn, name).get(alias)
    at = now()
    if previous is None:
        conn.execute(
            sa.insert(aliases).values(model=name, alias=alias, version=number, updated_at=at)
        )
    else:
        conn.execute(
            sa.update(aliases)
            .where(aliases.c.model == name, aliases.c.alias == alias)
            .values(version=number, updated_at=at)
        )
    conn.execute(
        sa.insert(alias_events).values(
            model=name, alias=alias, action=action, version=number, previous=previous, at=at, by=by
        )
    )
    return previous


def promote(engine: sa.Engine, ref: Ref, alias: str) -> tuple[int, int | None]:
    """Point ``alias`` at the version ``ref`` names; return (that version, the one it left)."""

    def work(conn: sa.Connection) -> tuple[int, int | None]:
        if not _lock_model(conn, ref.name):
            raise _no_model(conn, ref.name)
        number = _version_number(conn, ref)
        return number, _move_alias(conn, ref.name, alias, number, PROMOTE, user())

    return transaction(engine, work)


def _stack(events: list[Any]) -> list[int]:
    """The versions an alias pointed at, oldest first, with rolled-back moves taken off: a
    promote puts a version on top, a rollback takes the top one off."""
    stack: list[int] = []
    for e in events:
        if e.action == ROLLBACK:
            stack.pop()
        else:
            stack.append(e.version)
    return stack


def rollback(engine: sa.Engine, name: str, alias: str) -> tuple[int, int]:
    """Point ``alias`` back at the version it pointed at before; return (from, to)."""

    def work(conn: sa.Connection) -> tuple[int, int]:
        if not _lock_model(conn, name):
            raise _no_model(conn, name)
        current = _aliases_of(conn, name).get(alias)
        if current is None:
            raise RegistryError(
                f"{name}@{alias}: there is no such alias to roll back; set it first with "
                f"python -m engine.registry promote {name}@<version> --alias {alias}"
            )
        events = conn.execute(
            sa.select(alias_events)
            .where(alias_events.c.model == name, alias_events.c.alias == alias)
            .order_by(alias_events.c.id)
        ).all()
        stack = _stack(events)
        if len(stack) < 2:
            raise RegistryError(
                f"{name}@{alias} has no earlier version to roll back to (it has only ever "
                f"pointed at {name}@{current} since its last rollback). Use promote to point it "
                f"at another version."
            )
        target = stack[-2]
        state = conn.execute(
            sa.select(versions.c.state).where(
                versions.c.model == name, versions.c.version == target
            )
        ).scalar()
        if state != READY:
            raise RegistryError(
                f"{name}@{alias} pointed at {name}@{target} before, but that version was "
                f"deleted; use promote {name}@<version> --alias {alias} instead."
            )
        _move_alias(conn, name, alias, target, ROLLBACK, user())
        return current, target

    return transaction(engine, work)


def delete(engine: sa.Engine, ref: Ref) -> int:
    """Mark a version deleted (refused while an alias points at it); return its number."""

    def work(conn: sa.Connection) -> int:
        if not _lock_model(conn, ref.name):
            raise _no_model(conn, ref.name)
        if ref.version is None:
            raise RegistryError(
                f"delete {ref}: name the version by its number, e.g. delete {ref.name}@2, so "
                f"that an alias or 'latest' never deletes a version by accident."
            )
        number = _version_number(conn, ref)
        held = [a for a, v in _aliases_of(conn, ref.name).items() if v == number]
        if held:
            raise RegistryError(
                f"{ref.name}@{number} is not deleted: alias "
                f"{', '.join(f'@{a}' for a in held)} points at it. Move the alias first "
                f"(promote {ref.name}@<version> --alias {held[0]}, or rollback)."
            )
        conn.execute(
            sa.update(versions)
            .where(versions.c.model == ref.name, versions.c.version == number)
            .values(state=DELETED, deleted_at=now())
        )
        return number

    return transaction(engine, work)
