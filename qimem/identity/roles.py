"""Roles (named bundles of permissions) and grants of roles to users and service accounts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.errors import ConflictError, NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity.permissions import (
    BUILTIN_ROLES,
    validate_permissions,
    validate_role_name,
    validate_scope,
)


@dataclass(frozen=True)
class Role:
    realm: str
    name: str
    permissions: tuple[str, ...]
    builtin: bool
    description: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "name": self.name,
            "permissions": list(self.permissions),
            "builtin": self.builtin,
            "description": self.description,
        }


def _role(row: Any) -> Role:
    perms = BUILTIN_ROLES.get(row.name) if row.builtin else None
    return Role(
        row.realm,
        row.name,
        tuple(perms or row.permissions.split()),
        bool(row.builtin),
        row.description,
    )


def get(conn: Connection, realm: str, name: str) -> Role:
    row = conn.execute(
        sa.select(tables.roles).where(tables.roles.c.realm == realm, tables.roles.c.name == name)
    ).first()
    if row is None:
        raise NotFoundError(
            f"role {name!r} does not exist in realm {realm!r}", code="role_not_found"
        )
    return _role(row)


def create(
    conn: Connection, realm: str, name: str, permissions: Iterable[str], description: str = ""
) -> Role:
    validate_role_name(name)
    perms = validate_permissions(permissions)
    if len(description) > 256:
        raise ValidationError("role description is over 256 characters")
    exists = conn.execute(
        sa.select(tables.roles.c.name).where(
            tables.roles.c.realm == realm, tables.roles.c.name == name
        )
    ).first()
    if exists is not None:
        raise ConflictError(f"role {name!r} already exists in realm {realm!r}", code="role_exists")
    conn.execute(
        sa.insert(tables.roles).values(
            realm=realm,
            name=name,
            permissions=" ".join(perms),
            builtin=False,
            description=description,
        )
    )
    return Role(realm, name, perms, False, description)


def list_all(conn: Connection, realm: str) -> list[Role]:
    rows = conn.execute(
        sa.select(tables.roles).where(tables.roles.c.realm == realm).order_by(tables.roles.c.name)
    ).all()
    return [_role(r) for r in rows]


def permissions_by_role(conn: Connection, realm: str) -> dict[str, tuple[str, ...]]:
    return {r.name: r.permissions for r in list_all(conn, realm)}


def grant(conn: Connection, realm: str, user_id: str, role: str, scope: str | None) -> bool:
    """Grant ``role`` (optionally on key names matching ``scope``); False if already held."""
    get(conn, realm, role)
    scope = validate_scope(scope)
    held = conn.execute(
        sa.select(tables.grants.c.role).where(
            tables.grants.c.realm == realm,
            tables.grants.c.user_id == user_id,
            tables.grants.c.role == role,
            tables.grants.c.scope == scope,
        )
    ).first()
    if held is not None:
        return False
    conn.execute(
        sa.insert(tables.grants).values(realm=realm, user_id=user_id, role=role, scope=scope)
    )
    return True


def revoke(conn: Connection, realm: str, user_id: str, role: str, scope: str | None) -> bool:
    """Revoke a grant; ``scope=None`` revokes the role on every scope. True if any was held."""
    stmt = sa.delete(tables.grants).where(
        tables.grants.c.realm == realm,
        tables.grants.c.user_id == user_id,
        tables.grants.c.role == role,
    )
    if scope is not None:
        stmt = stmt.where(tables.grants.c.scope == validate_scope(scope))
    return conn.execute(stmt).rowcount > 0


def grants_of(conn: Connection, realm: str, user_id: str) -> list[tuple[str, str]]:
    """``(role, scope)`` pairs held by a user ('' scope = every key)."""
    rows = conn.execute(
        sa.select(tables.grants.c.role, tables.grants.c.scope)
        .where(tables.grants.c.realm == realm, tables.grants.c.user_id == user_id)
        .order_by(tables.grants.c.role, tables.grants.c.scope)
    ).all()
    return [(r.role, r.scope) for r in rows]
