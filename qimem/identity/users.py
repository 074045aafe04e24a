"""Users and service accounts: rows of ``qimem_users`` (``kind`` = user | client)."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from qimem.errors import ConflictError, NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity.authz_mac import Sealer

_USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


def validate_username(name: str, what: str = "username") -> str:
    if not isinstance(name, str) or not _USERNAME_RE.match(name):
        raise ValidationError(
            f"{what} must be letters, digits, '.', '_', '@', '+' or '-' (at most 128)",
            code="invalid_username",
        )
    return name


@dataclass(frozen=True)
class User:
    """A user or service account. The stored hash is kept out of the repr and to_dict."""

    user_id: str
    realm: str
    username: str
    kind: str
    enabled: bool
    failed_logins: int
    locked_until: float
    created_at: float
    secret_hash: str = field(repr=False)
    grants: tuple[tuple[str, str], ...] = ()
    #: Access tokens issued at or before this time are refused (finding 8 of issue 12).
    tokens_valid_after: float = 0.0
    #: The row's integrity MAC (:mod:`qimem.identity.authz_mac`).
    mac: str | None = field(default=None, repr=False)

    @property
    def roles(self) -> list[str]:
        return sorted({role for role, _ in self.grants})

    def to_dict(self) -> dict[str, Any]:
        return {
            "user_id": self.user_id,
            "realm": self.realm,
            "username": self.username,
            "kind": self.kind,
            "enabled": self.enabled,
            "locked": self.locked_until > time.time(),
            "roles": self.roles,
            "grants": [{"role": r, "scope": s or "*"} for r, s in self.grants],
            "created_at": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
        }


def user_of(row: Any) -> User:
    """The :class:`User` of a ``qimem_users`` row (every column)."""
    return _user(row)


def _user(row: Any, grants: list[tuple[str, str]] | None = None) -> User:
    return User(
        row.user_id,
        row.realm,
        row.username,
        row.kind,
        bool(row.enabled),
        int(row.failed_logins),
        float(row.locked_until),
        float(row.created_at),
        row.secret_hash,
        tuple(grants or ()),
        float(row.tokens_valid_after),
        row.mac,
    )


def create(
    conn: Connection, sealer: Sealer, realm: str, username: str, secret_hash: str, kind: str
) -> User:
    """A new, enabled user or service account, its row sealed."""
    validate_username(username, "client id" if kind == "client" else "username")
    if find(conn, realm, username) is not None:
        raise ConflictError(
            f"{'client' if kind == 'client' else 'user'} {username!r} already exists in realm "
            f"{realm!r}",
            code="user_exists",
        )
    now = time.time()
    user_id = str(uuid.uuid4())
    try:
        with conn.begin_nested():
            conn.execute(
                sa.insert(tables.users).values(
                    user_id=user_id,
                    realm=realm,
                    username=username,
                    kind=kind,
                    secret_hash=secret_hash,
                    enabled=True,
                    failed_logins=0,
                    locked_until=0.0,
                    created_at=now,
                )
            )
    except IntegrityError:
        raise ConflictError(
            f"{username!r} already exists in realm {realm!r}", code="user_exists"
        ) from None
    user = User(user_id, realm, username, kind, True, 0, 0.0, now, secret_hash)
    mac = sealer.user_mac(user)
    conn.execute(sa.update(tables.users).where(tables.users.c.user_id == user_id).values(mac=mac))
    return replace(user, mac=mac)


def find(conn: Connection, realm: str, username: str, *, for_update: bool = False) -> User | None:
    """The user ``username`` of ``realm``; ``for_update`` write-locks the row (PostgreSQL)."""
    stmt = sa.select(tables.users).where(
        tables.users.c.realm == realm, tables.users.c.username == username
    )
    row = conn.execute(stmt.with_for_update() if for_update else stmt).first()
    return _user(row) if row is not None else None


def get(conn: Connection, realm: str, username: str, *, for_update: bool = False) -> User:
    user = find(conn, realm, username, for_update=for_update)
    if user is None:
        raise NotFoundError(f"no user {username!r} in realm {realm!r}", code="user_not_found")
    return user


def by_id(conn: Connection, user_id: str) -> User | None:
    row = conn.execute(sa.select(tables.users).where(tables.users.c.user_id == user_id)).first()
    return _user(row) if row is not None else None


def list_all(conn: Connection, sealer: Sealer, realm: str, kind: str | None = None) -> list[User]:
    """The realm's users with their grants; a user failing his MAC is shown disabled and
    locked, and grants failing theirs are left out."""
    stmt = sa.select(tables.users).where(
        tables.users.c.realm == realm, tables.users.c.kind != "deleted"
    )  # a deleted service account's tombstone (qimem.identity.clients) is not listed
    if kind:
        stmt = stmt.where(tables.users.c.kind == kind)
    rows = conn.execute(stmt.order_by(tables.users.c.username)).all()
    grant_rows = conn.execute(
        sa.select(
            tables.grants.c.user_id,
            tables.grants.c.role,
            tables.grants.c.scope,
            tables.grants.c.mac,
        )
        .where(tables.grants.c.realm == realm)
        .order_by(tables.grants.c.role, tables.grants.c.scope)
    ).all()
    epochs = {r.user_id: float(r.tokens_valid_after) for r in rows}
    by_user: dict[str, list[tuple[str, str]]] = {}
    for g in grant_rows:
        epoch = epochs.get(g.user_id, 0.0)
        if sealer.grant_ok(realm, g.user_id, g.role, g.scope, epoch, g.mac):
            by_user.setdefault(g.user_id, []).append((g.role, g.scope))
    return [intact(sealer, _user(r, by_user.get(r.user_id))) for r in rows]


def intact(sealer: Sealer, user: User) -> User:
    """``user`` if his row is authentic; else the same user disabled and locked (and
    reported), so no login, token or refresh succeeds for him."""
    if sealer.user_ok(user):
        return user
    return replace(user, enabled=False, locked_until=float("inf"), grants=())


def set_secret_hash(conn: Connection, user_id: str, secret_hash: str) -> None:
    conn.execute(
        sa.update(tables.users)
        .where(tables.users.c.user_id == user_id)
        .values(secret_hash=secret_hash)
    )


def set_enabled(conn: Connection, user_id: str, enabled: bool) -> None:
    values: dict[str, Any] = {"enabled": enabled}
    if enabled:
        values.update(failed_logins=0, locked_until=0.0)
    conn.execute(sa.update(tables.users).where(tables.users.c.user_id == user_id).values(**values))


def reseal(conn: Connection, sealer: Sealer, user_id: str) -> None:
    """Recompute the MAC of a user row after a legitimate change (same transaction, the
    row already verified and write-locked by the caller)."""
    row = conn.execute(sa.select(tables.users).where(tables.users.c.user_id == user_id)).first()
    if row is not None:
        conn.execute(
            sa.update(tables.users)
            .where(tables.users.c.user_id == user_id)
            .values(mac=sealer.user_mac(row))
        )
