"""Per-user lockout after repeated failed logins.

Counting is one atomic conditional ``UPDATE ... SET failed_logins = failed_logins + 1``
(which also sets the lock when the threshold is reached), so concurrent guesses on many
servers are all counted, and a success is claimed by another conditional ``UPDATE`` that
re-checks the lock after the password hash was verified: no login succeeds after the failure
that locked the user was committed (finding 9 of issue 12).

A locked user is still hashed against, and gets the same error as a wrong password: nothing
tells an attacker a lockout happened.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables
from qimem.identity import users
from qimem.identity.settings import IdentitySettings
from qimem.identity.users import User


def is_locked(locked_until: float, now: float | None = None) -> bool:
    return locked_until > (now if now is not None else time.time())


def record_failure(
    conn: Connection, user_id: str, settings: IdentitySettings, now: float | None = None
) -> str:
    """Count a failed login in one atomic statement; the lock check is part of it.

    :returns: ``"counted"``, ``"locked_now"`` (this failure reached the threshold and locked
        the user) or ``"locked"`` (the user was locked already: not counted, as the
        outcome of a locked user is a refusal whatever the password).
    """
    now = time.time() if now is None else now
    c = tables.users.c
    reached = c.failed_logins + 1 >= settings.lockout_threshold
    row = conn.execute(
        sa.update(tables.users)
        .where(c.user_id == user_id, c.locked_until <= now)
        .values(
            failed_logins=sa.case((reached, 0), else_=c.failed_logins + 1),
            locked_until=sa.case((reached, now + settings.lockout_seconds), else_=c.locked_until),
        )
        .returning(c.locked_until)
    ).first()
    if row is None:
        return "locked"
    return "locked_now" if row.locked_until > now else "counted"


#: The claim's compare-and-set (built once: every successful password login sends it).
_CLAIM = (
    sa.update(tables.users)
    .where(
        tables.users.c.user_id == sa.bindparam("cl_user"),
        tables.users.c.locked_until <= sa.bindparam("cl_now"),
        tables.users.c.enabled.is_(True),
        tables.users.c.secret_hash == sa.bindparam("cl_hash"),
    )
    .values(failed_logins=0)
    .returning(*tables.users.c)
)


def claim(
    conn: Connection, user_id: str, verified_hash: str, now: float | None = None
) -> tuple[str | None, User | None]:
    """Turn a verified password into a successful login, atomically with the lock state.

    One conditional ``UPDATE`` (which takes the row's write lock) succeeds only if the user
    is, at this moment, still unlocked, enabled and has the very hash the password was
    verified against. A failure that locked the user while the hash was computing is
    therefore seen, and a password change or disable racing the login wins.

    :returns: ``(None, the user's row as it now is)`` on success (read by the same
        statement, under its lock), else ``(why not, None)``: ``locked``, ``disabled``,
        ``changed`` or ``unknown_user``.
    """
    now = time.time() if now is None else now
    c = tables.users.c
    claimed = conn.execute(
        _CLAIM, {"cl_user": user_id, "cl_now": now, "cl_hash": verified_hash}
    ).first()
    if claimed is not None:
        return None, users.user_of(claimed)
    row = conn.execute(sa.select(c.locked_until, c.enabled).where(c.user_id == user_id)).first()
    if row is None:
        return "unknown_user", None
    if row.locked_until > now:
        return "locked", None
    return ("disabled" if not row.enabled else "changed"), None


def unlock(conn: Connection, user_id: str) -> None:
    conn.execute(
        sa.update(tables.users)
        .where(tables.users.c.user_id == user_id)
        .values(failed_logins=0, locked_until=0.0)
    )
