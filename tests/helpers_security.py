"""Shared helpers for the tests/test_security_*.py attack tests: a real SQLite file or a
fresh PostgreSQL database, an app with identity on it, and raw SQL access for the attacker
who can write to the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app
from identity_helpers import with_identity

from qimem.app import AppContext
from qimem.services import identity as ids
from qimem.sql import create_engine

#: The two real databases every attack runs against.
STORES = ["sqlite", "postgres"]


def store_url(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    """A URL to an empty real database: an SQLite file, or a new PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'qimem.db'}"
    return str(request.getfixturevalue("postgres_url"))


def identity_app(url: str, root_key_b64: str, **settings: object) -> AppContext:
    """An app on ``url`` with identity (fast Argon2), realm master + admin/admin-password."""
    return with_identity(make_app(url, root_key_b64), **settings)


def close_app(app: AppContext) -> None:
    ids.close_identity(app)
    app.close()


def raw_sql(url: str, statement: str, **params: Any) -> int:
    """Run one SQL statement as a database writer without the root key; its rowcount."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            return int(conn.execute(sa.text(statement), params).rowcount)
    finally:
        engine.dispose()
