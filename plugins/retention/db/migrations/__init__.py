"""Alembic migrations of the schemas the pipeline owns (see retention.db.schema)."""


def execute_script(script: str) -> None:
    """Run `script` in the migration's connection with the driver's own execute: several
    statements sent as they are (no bind parameters, so `%` and `:` in it are plain text)."""
    from alembic import op

    op.get_bind().connection.driver_connection.execute(script)
