"""Shared helpers for the tests/test_security_*.py attack tests: a real SQLite file or a
fresh PostgreSQL database, an app with identity on it, and raw SQL access for the attacker
who can write to the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import make_app
from identity_helpers import fast_settings

from qimem.app import AppContext
from qimem.services import identity as ids
from qimem.sql import create_engine

#: The two real databases every attack runs against.
STORES = ["sqlite", "postgres"]
#: Passwords that pass the default password policy (finding 14).
ADMIN_PASSWORD = "quartz-lantern-harbor-4417"  # noqa: S105 (a test password)


def password_of(username: str) -> str:
    """A strong test password for ``username`` (not containing it)."""
    return f"moss-{len(username)}-violet-copper-{sum(map(ord, username)) % 997:03d}"


def store_url(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> str:
    """A URL to an empty real database: an SQLite file, or a new PostgreSQL database."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'qimem.db'}"
    return str(request.getfixturevalue("postgres_url"))


def identity_app(url: str, root_key_b64: str, **settings: object) -> AppContext:
    """An app on ``url`` with identity (fast Argon2), realm master + admin/ADMIN_PASSWORD."""
    app = make_app(url, root_key_b64)
    ids.configure(app, fast_settings(**settings))
    ids.bootstrap(app, ADMIN_PASSWORD)
    return app


def add_user(app: AppContext, realm: str, username: str, roles: list[str]) -> None:
    """Add ``username`` with password :func:`password_of` and ``roles``."""
    ids.add_user(app, realm, username, password_of(username), roles)


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
