"""The database schema's history as Alembic revisions; dicomnode.store.schema applies them."""
