"""The database schema's history as Alembic revisions; dicomnode.schema applies them."""
