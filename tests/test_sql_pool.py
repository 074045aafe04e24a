"""PostgreSQL pool liveness (qimem.sql.ping_idle_connections): a connection that sat idle
is pinged and replaced when its backend died; a just-used one is not pinged (no extra round
trip per transaction), so a death in that window costs one failed statement, after which the
pool recovers by itself."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from qimem.sql import PING_AFTER_IDLE, create_engine


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
