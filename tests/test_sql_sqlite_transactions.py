"""SQLite transactions through SQLAlchemy are real transactions (issue 15, red team).

pysqlite's legacy transaction control starts no transaction for ``SAVEPOINT``: a savepoint
opened before the first write of a transaction *is* the transaction, and releasing it
commits. So ``users.create`` (an INSERT in a savepoint, to catch the unique-name race, then
the row's MAC) made the row visible to other connections before its MAC was written, and a
failure after the savepoint left it behind. :func:`qimem.sql.create_engine` applies
SQLAlchemy's explicit-BEGIN recipe for pysqlite; these tests read with a second, real
connection while the first transaction is still open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from qimem.identity import db as tables
from qimem.identity import realms, users
from qimem.identity.db import Database
from qimem.sql import create_engine


class _Sealer:
    """A stand-in for the user-row MAC (this test is about transactions, not MACs)."""

    def user_mac(self, user: users.User) -> str:
        return "m" * 64


def _database(tmp_path: Path) -> tuple[Database, Path]:
    path = tmp_path / "qimem.db"
    database = Database.for_engine(create_engine(f"sqlite:///{path}"))
    with database.begin() as conn:
        realms.create(conn, "r")
    return database, path


def _outside(path: Path, username: str) -> tuple[str | None, ...] | None:
    """The user's row as another process sees it now (stdlib sqlite3, its own connection)."""
    with sqlite3.connect(path, timeout=5) as other:
        return other.execute(
            "SELECT username, mac FROM qimem_users WHERE username = ?", (username,)
        ).fetchone()


def test_a_new_user_is_invisible_to_others_until_its_transaction_commits(tmp_path: Path) -> None:
    database, path = _database(tmp_path)
    try:
        with database.begin() as conn:
            users.create(conn, _Sealer(), "r", "jit", "!external:jwt", "user")  # type: ignore[arg-type]
            assert _outside(path, "jit") is None  # not yet: the savepoint did not commit
        assert _outside(path, "jit") == ("jit", "m" * 64)  # committed with its MAC
    finally:
        database.engine.dispose()


def test_a_failure_after_the_savepoint_rolls_the_user_back(tmp_path: Path) -> None:
    database, path = _database(tmp_path)
    try:
        with pytest.raises(RuntimeError), database.begin() as conn:
            users.create(conn, _Sealer(), "r", "ghost", "!external:jwt", "user")  # type: ignore[arg-type]
            raise RuntimeError("a later step of the login fails")
        assert _outside(path, "ghost") is None
        with database.begin() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(tables.users)).scalar() == 0
    finally:
        database.engine.dispose()


def test_a_transaction_holds_the_write_lock_from_its_start(tmp_path: Path) -> None:
    """Read-then-write transactions (lock_user_row after a read, rotations) take SQLite's
    write lock at BEGIN: a second writer waits instead of failing later with
    SQLITE_BUSY_SNAPSHOT when its snapshot is stale."""
    database, path = _database(tmp_path)
    try:
        with database.begin() as conn:
            conn.execute(sa.select(tables.users.c.user_id)).all()  # a read only
            other = sqlite3.connect(path, timeout=0)
            try:
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            finally:
                other.close()
    finally:
        database.engine.dispose()
