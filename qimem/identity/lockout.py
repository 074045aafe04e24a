"""Per-user lockout after repeated failed logins.

Counting is one atomic ``UPDATE ... SET failed_logins = failed_logins + 1``, so concurrent
guesses on many servers are all counted. A locked user is still hashed against, and gets
the same error as a wrong password: nothing tells an attacker a lockout happened.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables
from qimem.identity.settings import IdentitySettings


def is_locked(locked_until: float, now: float | None = None) -> bool:
    return locked_until > (now if now is not None else time.time())


def record_failure(conn: Connection, user_id: str, settings: IdentitySettings) -> bool:
    """Count a failed login; True if this failure locked the user."""
    conn.execute(
        sa.update(tables.users)
        .where(tables.users.c.user_id == user_id)
        .values(failed_logins=tables.users.c.failed_logins + 1)
    )
    count = conn.execute(
        sa.select(tables.users.c.failed_logins).where(tables.users.c.user_id == user_id)
    ).scalar_one()
    if count >= settings.lockout_threshold:
        conn.execute(
            sa.update(tables.users)
            .where(tables.users.c.user_id == user_id)
            .values(failed_logins=0, locked_until=time.time() + settings.lockout_seconds)
        )
        return True
    return False


def record_success(conn: Connection, user_id: str) -> None:
    conn.execute(
        sa.update(tables.users)
        .where(tables.users.c.user_id == user_id, tables.users.c.failed_logins != 0)
        .values(failed_logins=0)
    )


def unlock(conn: Connection, user_id: str) -> None:
    conn.execute(
        sa.update(tables.users)
        .where(tables.users.c.user_id == user_id)
        .values(failed_logins=0, locked_until=0.0)
    )
