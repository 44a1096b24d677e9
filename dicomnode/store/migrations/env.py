"""Alembic's entry point, run by dicomnode.store.schema on the connection it passes in
(`config.attributes["connection"]`); there is no alembic.ini and no URL of its own."""

from alembic import context

from dicomnode.store.tables import Base

connection = context.config.attributes["connection"]
# Batch mode: SQLite cannot ALTER most things in place, so a changed table is copied over.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
