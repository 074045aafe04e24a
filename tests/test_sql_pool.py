"""PostgreSQL connections. Pool liveness (qimem.sql.ping_idle_connections): a connection
that sat idle is pinged and replaced when its backend died; a just-used one is not pinged
(no extra round trip per transaction), so a death in that window costs one failed
statement, after which the pool recovers by itself. Reads without a transaction
(qimem.sql.read_engine, Database.read)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from qimem.identity.db import Database
from qimem.sql import PING_AFTER_IDLE, create_engine, read_engine


def _backend_pid(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(url: str, pid: int) -> None:
    killer = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with killer.connect() as conn:
        assert conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar()
    killer.dispose()


def test_an_idle_dead_connection_is_replaced_before_use(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        pid = _backend_pid(engine)
        _terminate(postgres_url, pid)
        time.sleep(PING_AFTER_IDLE + 0.2)
        assert _backend_pid(engine) != pid  # no error: the ping found it dead
    finally:
        engine.dispose()


def test_a_just_used_dead_connection_fails_once_then_the_pool_recovers(postgres_url: str) -> None:
    engine = create_engine(postgres_url)
    try:
        pid = _backend_pid(engine)
        _terminate(postgres_url, pid)
        with pytest.raises(sa.exc.DBAPIError) as failure:
            _backend_pid(engine)  # not pinged: used within PING_AFTER_IDLE
        assert failure.value.connection_invalidated
        assert _backend_pid(engine) != pid
    finally:
        engine.dispose()


def _two_nows(conn: sa.Connection) -> tuple[object, object]:
    first = conn.execute(sa.text("SELECT now()")).scalar()
    time.sleep(0.01)
    return first, conn.execute(sa.text("SELECT now()")).scalar()


def test_reads_on_postgres_run_without_a_transaction(postgres_url: str) -> None:
    """read_engine and Database.read: each statement is its own transaction (now() moves),
    which is what saves the BEGIN and ROLLBACK round trips; begin() still makes one."""
    engine = create_engine(postgres_url)
    try:
        with read_engine(engine).connect() as conn:
            first, second = _two_nows(conn)
            assert first != second
        with engine.begin() as conn:
            first, second = _two_nows(conn)
            assert first == second
        database = Database.for_engine(engine)
        with database.read() as conn:
            first, second = _two_nows(conn)
            assert first != second
        with database.begin() as conn:  # and the pooled connection left autocommit behind
            first, second = _two_nows(conn)
            assert first == second
    finally:
        engine.dispose()


def test_reads_elsewhere_use_the_engine_as_it_is(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'reads.db'}")
    try:
        assert read_engine(engine) is engine
        with Database.for_engine(engine).read() as conn:  # a transaction, as begin()
            assert conn.in_transaction()
    finally:
        engine.dispose()
