"""Bring the node's database to the schema this version of dicomnode needs, keeping its data.

Every process that opens the database (the service, each CLI command) first runs the Alembic
revisions under dicomnode/store/migrations that the database has not had yet, one process at a time:

  empty database                       every revision, from the first;
  made before migrations (create_all)  stamped with the baseline revision, then upgraded;
  at an older revision                 the revisions after it (an upgraded node keeps its
                                       queue, index and events);
  at the newest revision               nothing (one read of alembic_version);
  at a revision this code lacks        SchemaError: a newer dicomnode upgraded it, and this
                                       one would misread it.

The upgrade is one transaction: a revision that fails leaves the database as it was.

One process at a time: an exclusive flock on `<database>.lock` beside the SQLite file (not on
the database file itself: closing any descriptor of a file drops the POSIX locks SQLite holds on
it), held from the first connection (which turns a new file to WAL mode) to the end of any
upgrade, or a PostgreSQL advisory lock held for the upgrade's transaction.
"""

from __future__ import annotations

import fcntl
import logging
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("dicomnode.schema")  # the name it had before it moved: journald filters and tests use it

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the schema create_all made before migrations began
_PG_LOCK_KEY = 0x6D6E6F6465  # any constant shared by every dicomnode process


class SchemaError(RuntimeError):
    """The database cannot be brought to this version's schema; the message says why."""


def head_revision() -> str:
    return _scripts().get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade_schema(engine: Engine) -> None:
    """Apply the revisions the database lacks (see the module docstring); SchemaError if it is newer."""
    with _one_process_at_a_time(engine):
        # the first look under the lock too: a new SQLite file's first connection turns on WAL
        # mode, which several processes doing at once can answer "database is locked" without
        # waiting out the busy timeout (seen once in a full test run)
        if _checked(current_revision(engine)) == head_revision():
            return
        _upgrade(engine)


def _upgrade(engine: Engine) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif engine.dialect.name == "sqlite":
            # pysqlite runs DDL outside any transaction unless one is open: open it, so a
            # revision that fails leaves the database as it was, not half migrated
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        current = _checked(MigrationContext.configure(connection).get_current_revision())
        if current == head_revision():
            return  # another process upgraded it while this one waited
        alembic = alembic_config(connection)
        if current is None and inspect(connection).has_table("jobs"):
            log.info("database %s: made before schema migrations; stamped as revision %s", _where(engine), BASELINE)
            command.stamp(alembic, BASELINE)
            current = BASELINE
        command.upgrade(alembic, "head")
        log.info("database %s: schema upgraded from %s to %s", _where(engine), current or "empty", head_revision())


def _checked(revision: str | None) -> str | None:
    if revision is not None and revision not in _known_revisions():
        raise SchemaError(f"the database is at schema revision {revision!r}, which this dicomnode does not know "
                          f"(it knows up to {head_revision()!r}): a newer dicomnode has upgraded it. Run that "
                          "version, or point database_url at another database")
    return revision


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


@cache
def _known_revisions() -> frozenset[str]:
    return frozenset(script.revision for script in _scripts().walk_revisions())


def alembic_config(connection: Connection) -> AlembicConfig:
    alembic = AlembicConfig()
    alembic.set_main_option("script_location", str(MIGRATIONS))
    alembic.attributes["connection"] = connection
    return alembic


@contextmanager
def _one_process_at_a_time(engine: Engine) -> Iterator[None]:
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        yield  # PostgreSQL: the advisory lock; an in-memory database has one process anyway
        return
    with open(f"{database}.lock", "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)
