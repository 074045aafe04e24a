"""Roles (named bundles of permissions) and grants of roles to users and service accounts."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.errors import ConflictError, NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity.authz_mac import Sealer
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


def _role(row: Any, sealer: Sealer | None = None) -> Role:
    """A role from its row; with ``sealer``, a row failing its MAC has no permissions."""
    if sealer is not None and not sealer.role_ok(row):
        return Role(row.realm, row.name, (), bool(row.builtin), row.description)
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
    conn: Connection,
    sealer: Sealer,
    realm: str,
    name: str,
    permissions: Iterable[str],
    description: str = "",
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
    values = {
        "realm": realm,
        "name": name,
        "permissions": " ".join(perms),
        "builtin": False,
        "description": description,
    }
    mac = sealer.role_mac(SimpleNamespace(**values))
    conn.execute(sa.insert(tables.roles).values(**values, mac=mac))
    return Role(realm, name, perms, False, description)


def seal_builtin(conn: Connection, sealer: Sealer, realm: str) -> None:
    """MAC the built-in role rows of a realm just created (in its transaction)."""
    rows = conn.execute(
        sa.select(tables.roles).where(
            tables.roles.c.realm == realm, tables.roles.c.name.in_(list(BUILTIN_ROLES))
        )
    ).all()
    for row in rows:
        conn.execute(
            sa.update(tables.roles)
            .where(tables.roles.c.realm == realm, tables.roles.c.name == row.name)
            .values(mac=sealer.role_mac(row))
        )


def list_all(conn: Connection, realm: str, sealer: Sealer | None = None) -> list[Role]:
    """The realm's roles; with ``sealer``, roles failing their MAC have no permissions."""
    rows = conn.execute(
        sa.select(tables.roles).where(tables.roles.c.realm == realm).order_by(tables.roles.c.name)
    ).all()
    return [_role(r, sealer) for r in rows]


def permissions_by_role(
    conn: Connection, realm: str, sealer: Sealer | None = None
) -> dict[str, tuple[str, ...]]:
    return {r.name: r.permissions for r in list_all(conn, realm, sealer)}


def _epoch(conn: Connection, user_id: str) -> float:
    value = conn.execute(
        sa.select(tables.users.c.tokens_valid_after).where(tables.users.c.user_id == user_id)
    ).scalar()
    return float(value or 0.0)


def grant(
    conn: Connection, sealer: Sealer, realm: str, user_id: str, role: str, scope: str | None
) -> bool:
    """Grant ``role`` (optionally on key names matching ``scope``); False if already held.

    A row for the same grant that fails its MAC (written by someone without the root key)
    is taken over: this grant is authorized, so the row is sealed now."""
    get(conn, realm, role)
    scope = validate_scope(scope)
    g = tables.grants.c
    where = (g.realm == realm, g.user_id == user_id, g.role == role, g.scope == scope)
    held = conn.execute(sa.select(g.mac).where(*where)).first()
    epoch = _epoch(conn, user_id)
    mac = sealer.grant_mac(realm, user_id, role, scope, epoch)
    if held is not None:
        if held.mac == mac:
            return False
        conn.execute(sa.update(tables.grants).where(*where).values(mac=mac))
        return True
    conn.execute(
        sa.insert(tables.grants).values(
            realm=realm, user_id=user_id, role=role, scope=scope, mac=mac
        )
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


_GRANTS_OF = (  # built once: every login and token refresh reads it
    sa.select(
        tables.grants.c.role,
        tables.grants.c.scope,
        tables.grants.c.mac,
        tables.users.c.tokens_valid_after,
    )
    .join_from(tables.grants, tables.users, tables.users.c.user_id == tables.grants.c.user_id)
    .where(
        tables.grants.c.realm == sa.bindparam("go_realm"),
        tables.grants.c.user_id == sa.bindparam("go_user"),
    )
    .order_by(tables.grants.c.role, tables.grants.c.scope)
)


def grants_of(conn: Connection, sealer: Sealer, realm: str, user_id: str) -> list[tuple[str, str]]:
    """``(role, scope)`` pairs held by a user ('' scope = every key); grants failing their
    MAC are left out (and reported)."""
    # the grants and the user's epoch (their MACs' input) in one read
    rows = conn.execute(_GRANTS_OF, {"go_realm": realm, "go_user": user_id}).all()
    return [
        (r.role, r.scope)
        for r in rows
        if sealer.grant_ok(
            realm, user_id, r.role, r.scope, float(r.tokens_valid_after or 0.0), r.mac
        )
    ]


def reseal_grants(
    conn: Connection,
    sealer: Sealer,
    realm: str,
    user_id: str,
    valid: list[tuple[str, str]],
) -> None:
    """Re-MAC the grants in ``valid`` (checked before) under the user's current epoch."""
    epoch = _epoch(conn, user_id)
    g = tables.grants.c
    for role, scope in valid:
        conn.execute(
            sa.update(tables.grants)
            .where(g.realm == realm, g.user_id == user_id, g.role == role, g.scope == scope)
            .values(mac=sealer.grant_mac(realm, user_id, role, scope, epoch))
        )


def grants_of_rows(conn: Connection, realm: str, user_id: str) -> list[tuple[str, str]]:
    """Every ``(role, scope)`` row of a user, authentic or not (no check)."""
    g = tables.grants.c
    rows = conn.execute(
        sa.select(g.role, g.scope).where(g.realm == realm, g.user_id == user_id)
    ).all()
    return [(r.role, r.scope) for r in rows]
