"""Realms (tenants): rows of ``qimem_realms``, each seeded with the built-in roles."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.errors import ConflictError, NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity.permissions import BUILTIN_DESCRIPTIONS, BUILTIN_ROLES
from qimem.keys import validate_realm

MASTER = "master"


@dataclass(frozen=True)
class Realm:
    name: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
        }


def exists(conn: Connection, name: str) -> bool:
    return (
        conn.execute(sa.select(tables.realms.c.name).where(tables.realms.c.name == name)).first()
        is not None
    )


def require(conn: Connection, name: str) -> None:
    """:raises NotFoundError: no realm ``name``."""
    if not isinstance(name, str) or not exists(conn, name):
        raise NotFoundError(f"realm {name!r} does not exist", code="realm_not_found")


def create(conn: Connection, name: str) -> Realm:
    """Create a realm with the built-in roles. :raises ConflictError: it exists."""
    validate_realm(name)
    if exists(conn, name):
        raise ConflictError(f"realm {name!r} already exists", code="realm_exists")
    now = time.time()
    conn.execute(sa.insert(tables.realms).values(name=name, created_at=now))
    conn.execute(
        sa.insert(tables.roles),
        [
            {
                "realm": name,
                "name": role,
                "permissions": " ".join(perms),
                "builtin": True,
                "description": BUILTIN_DESCRIPTIONS[role],
            }
            for role, perms in BUILTIN_ROLES.items()
        ],
    )
    return Realm(name, now)


def list_all(conn: Connection) -> list[Realm]:
    rows = conn.execute(sa.select(tables.realms).order_by(tables.realms.c.name)).all()
    return [Realm(r.name, r.created_at) for r in rows]


def delete(conn: Connection, name: str) -> None:
    """Delete a realm and all its identities, roles, keys for tokens and sessions."""
    if name == MASTER:
        raise ValidationError("the master realm cannot be deleted", code="realm_protected")
    require(conn, name)
    for table in (
        tables.grants,
        tables.refresh_tokens,
        tables.revoked_tokens,
        tables.signing_keys,
        tables.users,
        tables.roles,
    ):
        conn.execute(sa.delete(table).where(table.c.realm == name))
    conn.execute(sa.delete(tables.realms).where(tables.realms.c.name == name))
