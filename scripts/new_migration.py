"""Write the next schema migration after a change to dicomnode/store/tables.py.

    .venv/bin/python scripts/new_migration.py "add jobs.priority"

Alembic compares the models with a scratch SQLite database at the newest revision and writes
dicomnode/store/migrations/versions/NNNN_<message>.py with the operations it found. Read it before
committing (Alembic cannot tell a renamed column from a dropped and added one, and fills no
data), add a downgrade that undoes it, and run tests/test_schema.py, which fails while the
models and the migrations differ.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine

from dicomnode.store.schema import MIGRATIONS, alembic_config, head_revision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", help="what the change does, e.g. 'add jobs.priority'")
    args = parser.parse_args()
    number = re.match(r"\d+", head_revision())[0]  # "0006" -> "0006" (a revision named with a suffix keeps its number)
    rev_id = f"{int(number) + 1:04d}"
    with tempfile.TemporaryDirectory() as scratch:
        engine = create_engine(f"sqlite:///{scratch}/schema.db")
        with engine.begin() as connection:
            config = alembic_config(connection)
            config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
            command.upgrade(config, "head")
            [script] = [command.revision(config, message=args.message, autogenerate=True, rev_id=rev_id)]
    written = Path(script.path)
    if not re.search(r"op\.\w+\(", written.read_text()):
        written.unlink()
        sys.exit("no migration written: the models and the migrations already agree")
    print(f"wrote {written.relative_to(MIGRATIONS.parents[1])}: read it, then run tests/test_schema.py")


if __name__ == "__main__":
    main()
