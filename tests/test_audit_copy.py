"""The buffered audit flush on PostgreSQL writes with one ``COPY`` (qimem.identity.audit's
``insert_fresh_rows``): every record arrives exactly once, byte for byte, whatever its
text holds, and a batch that meets a record already stored falls back to the idempotent
insert instead of losing the batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from qimem.identity import db as tables
from qimem.identity.audit import AuditLog, audit_row, insert_fresh_rows, insert_rows
from qimem.identity.db import Database

pytestmark = pytest.mark.postgres

# What COPY's text format must escape (tab, newline, carriage return, backslash), its
# end-of-data marker, a quote, and text outside ASCII.
AWKWARD = ["a\tb", "line\nbreak", "cr\rhere", "back\\slash", "\\.", "quote'\"", "ключ-🔑", "\\N"]


@pytest.fixture
def database(postgres_url: str) -> Iterator[Database]:
    engine = sa.create_engine(postgres_url)
    found = Database.for_engine(engine)  # migrated to HEAD
    yield found
    engine.dispose()


def made_rows(n: int, action: str = "crypto.encrypt") -> list[dict[str, Any]]:
    return [audit_row("master", "u@master", action, f"k.{i}", "success", {}) for i in range(n)]


def stored(database: Database) -> list[dict[str, Any]]:
    columns = ("at", "realm", "actor", "action", "target", "outcome", "detail", "record_id")
    with database.engine.connect() as conn:
        rows = conn.execute(sa.select(*(tables.audit.c[c] for c in columns))).all()
    return [dict(zip(columns, row, strict=True)) for row in rows]


def test_a_buffered_flush_stores_every_record_exactly_as_made(database: Database) -> None:
    log = AuditLog(database, flush_interval=30)
    made = []
    for i, text in enumerate(AWKWARD * 3):
        log.record("master", f"u{i}@master", "crypto.encrypt", text, buffered=True, note=text)
    with log._lock:  # the rows as the flush will see them
        made = [dict(row) for row in log._buffer]
    log.flush()
    found = {row["record_id"]: row for row in stored(database)}
    assert len(found) == len(made) == len(AWKWARD) * 3
    for row in made:
        assert found[row["record_id"]] == row  # every column, byte for byte
    log.close()


def test_a_batch_meeting_a_stored_record_is_inserted_once_not_lost(database: Database) -> None:
    rows = made_rows(50)
    with database.engine.begin() as conn:
        insert_rows(conn, rows[20:21])  # a flush that committed but whose answer was lost
    with database.engine.begin() as conn:
        insert_fresh_rows(conn, rows)  # the retry of the whole batch
    found = stored(database)
    assert sorted(r["record_id"] for r in found) == sorted(r["record_id"] for r in rows)


def test_the_fallback_keeps_the_callers_transaction(database: Database) -> None:
    """The COPY that fails is rolled back to its savepoint only: what the transaction wrote
    before it stays, and the transaction commits."""
    rows = made_rows(5, "keys.rotate")
    before = audit_row("master", "u@master", "keys.create", "k", "success", {})
    with database.engine.begin() as conn:
        insert_rows(conn, rows[:1])
    with database.engine.begin() as conn:
        insert_rows(conn, [before])
        insert_fresh_rows(conn, rows)
    ids = {r["record_id"] for r in stored(database)}
    assert ids == {before["record_id"], *(r["record_id"] for r in rows)}


def test_a_failing_copy_leaves_nothing_behind(database: Database) -> None:
    """A row PostgreSQL refuses (text with a NUL byte) fails the whole batch: nothing of it
    is half-written, and the caller sees the error (the flush keeps the rows to retry)."""
    rows = made_rows(5)
    rows[3]["target"] = "bad\x00target"
    with pytest.raises(psycopg.DataError), database.engine.begin() as conn:
        insert_fresh_rows(conn, rows)
    assert stored(database) == []


def test_a_fresh_batch_is_one_copy_not_one_insert_per_row(database: Database) -> None:
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    sa.event.listen(database.engine, "before_cursor_execute", seen)
    try:
        with database.engine.begin() as conn:
            insert_fresh_rows(conn, made_rows(40))
    finally:
        sa.event.remove(database.engine, "before_cursor_execute", seen)
    assert "INSERT" not in statements  # the rows went by COPY (not seen by this event)
    assert len(stored(database)) == 40


def test_a_record_with_a_nul_is_stored_and_does_not_block_the_next(database: Database) -> None:
    """PostgreSQL text cannot hold U+0000: a record carrying one (in any field) is stored
    with U+FFFD in its place, instead of failing its batch and every flush after it."""
    log = AuditLog(database, flush_interval=30)
    log.record("master", "u\x00@master", "crypto.encrypt", "k\x00.1", buffered=True, note="a\x00")
    log.record("master", "u@master", "crypto.encrypt", "k.2", buffered=True)
    log.flush()
    found = sorted((r["actor"], r["target"], r["detail"]) for r in stored(database))
    assert found == [
        ("u@master", "k.2", "{}"),
        ("u\ufffd@master", "k\ufffd.1", '{"note": "a\\u0000"}'),
    ]
    log.close()
