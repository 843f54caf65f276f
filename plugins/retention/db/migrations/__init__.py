"""Alembic migrations of the schemas the pipeline owns (see retention.db.schema)."""
