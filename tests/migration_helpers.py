"""Shared helpers for the tests that move a real database between Alembic revisions."""

from __future__ import annotations

import sqlalchemy as sa

from qimem.sql import create_engine, sqlite_foreign_keys


def alembic(conn: sa.Connection, action: str, revision: str) -> None:
    """Alembic's ``upgrade`` or ``downgrade`` to ``revision`` on ``conn``."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "qimem.builtin_plugins.sql:migrations")
    config.attributes["connection"] = conn
    getattr(command, action)(config, revision)


def downgrade(url: str, revision: str) -> None:
    """Take the database at ``url`` back to ``revision``, keeping its rows (SQLite's batch
    mode recreates tables, so its foreign keys are off meanwhile)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                sqlite_foreign_keys(conn, False)  # outside a transaction (qimem.sql)
            with conn.begin():
                alembic(conn, "downgrade", revision)
    finally:
        engine.dispose()
