"""dicomnode.store.schema: the migrations make exactly the models' schema, upgrade an older database
keeping its rows, adopt a database made before migrations, refuse one a newer dicomnode upgraded,
and let several processes open a new database at once."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from dicomnode.cli import app
from dicomnode.config import Priority, load_config
from dicomnode.store import schema
from dicomnode.store.engine import make_engine, make_sessionmaker
from dicomnode.store.events import event_data
from dicomnode.store.schema import (
    BASELINE,
    SchemaError,
    alembic_config,
    current_revision,
    head_revision,
)
from dicomnode.store.tables import Base, Event, Job

from tests.support.nodeutil import write_config
from tests.support.schemautil import open_at_once

AT = datetime(2026, 11, 23, 8, 30, tzinfo=timezone.utc)


def _at_revision(path: Path, revision: str, *, keep_version_table: bool = True) -> None:
    """A database file as the migrations up to `revision` leave it, with one job and its event."""
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)
        connection.exec_driver_sql(
            "INSERT INTO jobs (study_uid, model, state, attempts, max_attempts, run_number, not_before, created_at) "
            "VALUES ('1.2.3', 'demo-petct', 'succeeded', 1, 3, 1, '2026-11-23 08:30:00', '2026-11-23 08:30:00')")
        connection.exec_driver_sql(
            "INSERT INTO events (at, study_uid, job_id, kind, message) "
            "VALUES ('2026-11-23 08:31:00', '1.2.3', 1, 'inference-done', '12.5 s on cpu, 840 foreground voxels')")
        if not keep_version_table:
            connection.exec_driver_sql("DROP TABLE alembic_version")
    engine.dispose()


def _indexes(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {row[1] for row in connection.execute(f"PRAGMA index_list({table})")}


def test_migrations_make_exactly_the_models_schema(tmp_path: Path):
    """A model changed without a migration (or the other way round) fails here."""
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}


def test_an_older_database_is_upgraded_and_keeps_its_rows(tmp_path: Path):
    path = tmp_path / "node.db"
    _at_revision(path, BASELINE)
    assert "ix_events_kind" not in _indexes(path, "events")
    sessions = make_sessionmaker(f"sqlite:///{path}")
    with sessions() as session:
        job = session.scalar(select(Job))
        event = session.scalar(select(Event))
    assert (job.study_uid, job.state, job.created_at) == ("1.2.3", "succeeded", AT)
    assert job.priority == Priority.NORMAL  # revision 0006: jobs made before priorities are normal
    assert (event.job_id, event.kind) == (job.id, "inference-done")
    assert event_data(event) == {"seconds": 12.5, "device": "cpu"}  # 0003 gave the old event its data
    assert "ix_events_kind" in _indexes(path, "events")
    assert current_revision(sessions.kw["bind"]) == head_revision()


def test_a_database_made_before_migrations_is_stamped_and_upgraded(tmp_path: Path, caplog):
    path = tmp_path / "node.db"
    _at_revision(path, BASELINE, keep_version_table=False)
    with caplog.at_level("INFO", logger="dicomnode.schema"):
        engine = make_engine(f"sqlite:///{path}")
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 1
    assert f"made before schema migrations; stamped as revision {BASELINE}" in caplog.text
    assert f"schema upgraded from {BASELINE} to {head_revision()}" in caplog.text


def test_a_database_from_a_newer_dicomnode_is_refused_with_its_reason(tmp_path: Path):
    config_path = write_config(tmp_path)
    path = Path(make_url(load_config(config_path).database_url).database)
    path.parent.mkdir(parents=True, exist_ok=True)
    _at_revision(path, "head")
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(SchemaError, match="schema revision '0099', which this dicomnode does not know"):
        make_engine(f"sqlite:///{path}")
    result = CliRunner().invoke(app, ["jobs", "list", "--config", str(config_path)])
    assert result.exit_code == 2
    assert "database error:" in result.stdout and "a newer dicomnode has upgraded it" in " ".join(result.stdout.split())


@pytest.mark.e2e
def test_processes_opening_a_new_database_at_once_upgrade_it_once(tmp_path: Path):
    """The lock: without it, a second process's CREATE TABLE fails on the first's tables."""
    assert open_at_once(f"sqlite:///{tmp_path / 'node.db'}") == [head_revision()] * 4
    with sqlite3.connect(tmp_path / "node.db") as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]


HEAD = head_revision()
BROKEN = "9998"  # a revision after every real one


@pytest.fixture
def broken_revision(tmp_path: Path, monkeypatch):
    """The migrations plus a next revision that creates an index and then fails."""
    folder = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / f"{BROKEN}_broken.py").write_text(
        f'from alembic import op\n\nrevision = "{BROKEN}"\ndown_revision = "{HEAD}"\nbranch_labels = None\n'
        'depends_on = None\n\n\n'
        "def upgrade():\n"
        '    op.create_index("ix_jobs_model", "jobs", ["model"])\n'
        '    op.execute("INSERT INTO no_such_table VALUES (1)")\n')
    monkeypatch.setattr(schema, "MIGRATIONS", folder)
    _forget_scripts()
    yield
    _forget_scripts()


def _forget_scripts() -> None:
    """schema caches the migrations folder it read: read the (patched or restored) one again."""
    schema._scripts.cache_clear()
    schema._known_revisions.cache_clear()


def test_a_failing_revision_leaves_the_database_as_it_was(tmp_path: Path, broken_revision):
    path = tmp_path / "node.db"
    _at_revision(path, HEAD)
    with pytest.raises(Exception, match="no such table: no_such_table"):
        make_engine(f"sqlite:///{path}")
    assert "ix_jobs_model" not in _indexes(path, "jobs")  # the broken revision's first step undone
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    new = tmp_path / "new.db"
    with pytest.raises(Exception, match="no such table: no_such_table"):
        make_engine(f"sqlite:///{new}")
    with sqlite3.connect(new) as connection:  # not even 0001's tables: all revisions or none
        assert connection.execute("SELECT name FROM sqlite_master").fetchall() == []
