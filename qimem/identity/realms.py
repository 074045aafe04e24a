"""Realms (tenants): rows of ``qimem_realms``, each seeded with the built-in roles.

A realm's login configuration (its provider chain, the providers' options and how external
identities map to qimem users and roles; :mod:`qimem.identity.providers`) is one row of
``qimem_realm_auth`` (migration 0007), stored sealed under the root key: a database writer
without it can neither read a directory's service password nor change the role mapping. A
realm without a row logs in with the built-in ``password`` provider alone.
"""

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

#: The realm's login configuration: JSON sealed with the root key (migration 0007).
realm_auth = sa.Table(
    "qimem_realm_auth",
    tables.metadata,
    sa.Column("realm", sa.String(64), primary_key=True),
    sa.Column("config", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)


@dataclass(frozen=True)
class Realm:
    name: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": datetime.fromtimestamp(self.created_at, UTC).isoformat(),
        }


_EXISTS = sa.select(tables.realms.c.name).where(tables.realms.c.name == sa.bindparam("ex_name"))


def exists(conn: Connection, name: str) -> bool:
    return conn.execute(_EXISTS, {"ex_name": name}).first() is not None


def require(conn: Connection, name: str) -> None:
    """:raises NotFoundError: no realm ``name``."""
    if not isinstance(name, str) or not exists(conn, name):
        raise NotFoundError(f"realm {name!r} does not exist", code="realm_not_found")


def created_at(conn: Connection, name: str) -> float:
    """When realm ``name`` was created. :raises NotFoundError: no such realm."""
    found = None
    if isinstance(name, str):
        found = conn.execute(
            sa.select(tables.realms.c.created_at).where(tables.realms.c.name == name)
        ).scalar_one_or_none()
    if found is None:
        raise NotFoundError(f"realm {name!r} does not exist", code="realm_not_found")
    return float(found)


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
        realm_auth,
        tables.client_secrets,
        tables.otp,
        tables.otp_recovery,
        tables.realm_policy,
        tables.grants,
        tables.refresh_tokens,
        tables.revoked_tokens,
        tables.signing_keys,
        tables.users,
        tables.roles,
    ):
        conn.execute(sa.delete(table).where(table.c.realm == name))
    conn.execute(sa.delete(tables.realms).where(tables.realms.c.name == name))


def _login_view(match: Any) -> sa.Select[Any]:
    r, u = tables.realms, tables.users
    return (
        sa.select(r.c.name.label("realm_name"), realm_auth.c.config.label("auth_config"), u)
        .select_from(
            r.outerjoin(realm_auth, realm_auth.c.realm == r.c.name).outerjoin(
                u, sa.and_(u.c.realm == r.c.name, match)
            )
        )
        .where(r.c.name == sa.bindparam("lv_realm"))
    )


# Built once (every login sends one): building a statement costs as much as running it.
_LOGIN_VIEW = _login_view(tables.users.c.username == sa.bindparam("lv_username"))
_LOGIN_VIEW_NO_USER = _login_view(sa.false())


def login_view(conn: Connection, name: str, username: str | None) -> tuple[bool, Any, bytes | None]:
    """What a login reads first, in one statement: whether realm ``name`` exists, the
    ``qimem_users`` row of ``username`` in it (None: none, or ``username`` is None), and
    the realm's sealed login configuration (None: password only)."""
    if username is None:
        row = conn.execute(_LOGIN_VIEW_NO_USER, {"lv_realm": name}).first()
    else:
        row = conn.execute(_LOGIN_VIEW, {"lv_realm": name, "lv_username": username}).first()
    if row is None:
        return False, None, None
    config = bytes(row.auth_config) if row.auth_config is not None else None
    return True, (row if row.user_id is not None else None), config


def auth_config_blob(conn: Connection, name: str) -> bytes | None:
    """The sealed login configuration of realm ``name``, or None (password only)."""
    row = conn.execute(sa.select(realm_auth.c.config).where(realm_auth.c.realm == name)).first()
    return bytes(row.config) if row is not None else None


def set_auth_config_blob(conn: Connection, name: str, blob: bytes | None) -> None:
    """Store (``None``: remove) the sealed login configuration of realm ``name``."""
    conn.execute(sa.delete(realm_auth).where(realm_auth.c.realm == name))
    if blob is not None:
        conn.execute(sa.insert(realm_auth).values(realm=name, config=blob, updated_at=time.time()))
