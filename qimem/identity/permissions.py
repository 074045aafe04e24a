"""Permissions, built-in roles, and the authenticated principal that checks them.

A grant gives a role to a user or service account, optionally scoped to key names matching
an fnmatch pattern (``encryptor`` on ``payroll-*``). A scoped grant covers an operation on a
named key whose name matches; it never covers realm-wide operations such as listing keys.

The signing and MAC permissions (issue 16) are held by ``admin`` only among the built-in
roles: adding them to ``encryptor`` would widen every existing grant of it, and a new
built-in role would be missing from realms created before it (built-in role rows are made
with the realm). Deployments bundle them in custom roles (docs/identity.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qimem.errors import ValidationError

PERMISSIONS: tuple[str, ...] = (
    "keys:create",
    "keys:read",
    "keys:rotate",
    "crypto:encrypt",
    "crypto:decrypt",
    "crypto:rewrap",
    "crypto:datakey",
    "keys:sign",
    "keys:verify",
    "keys:mac",
    "keys:verify-mac",
    "users:admin",
    "realms:admin",
    "plugins:read",
    "plugins:admin",
    "audit:read",
)

BUILTIN_ROLES: dict[str, tuple[str, ...]] = {
    "admin": PERMISSIONS,
    "key-manager": ("keys:create", "keys:read", "keys:rotate", "crypto:rewrap", "plugins:read"),
    "encryptor": (
        "keys:read",
        "crypto:encrypt",
        "crypto:decrypt",
        "crypto:rewrap",
        "crypto:datakey",
    ),
    "auditor": ("audit:read", "keys:read", "plugins:read"),
}

BUILTIN_DESCRIPTIONS = {
    "admin": "everything, including users, realms and plugins",
    "key-manager": "create, read and rotate keys",
    "encryptor": "encrypt, decrypt, rewrap and data keys",
    "auditor": "read the audit log, keys and plugins",
}

_ROLE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_SCOPE_RE = re.compile(r"^[A-Za-z0-9*?\[\]!._-]{1,128}$")


def validate_role_name(name: str) -> str:
    if not isinstance(name, str) or not _ROLE_RE.match(name):
        raise ValidationError(
            "role name must be lowercase letters, digits, '.', '_' or '-', starting with a letter",
            code="invalid_role",
        )
    return name


def validate_permissions(perms: Iterable[str]) -> tuple[str, ...]:
    """Check permission names against §7's list; duplicates dropped, order kept."""
    result = tuple(dict.fromkeys(perms))
    unknown = [p for p in result if p not in PERMISSIONS]
    if unknown:
        raise ValidationError(
            f"unknown permission {unknown[0]!r} (known: {' '.join(PERMISSIONS)})",
            code="invalid_permission",
        )
    if not result:
        raise ValidationError("a role needs at least one permission", code="invalid_permission")
    return result


def validate_scope(scope: str | None) -> str:
    """A key-name pattern for a scoped grant ('' for an unscoped one)."""
    if scope is None or scope == "" or scope == "*":
        return ""
    if not isinstance(scope, str) or not _SCOPE_RE.match(scope):
        raise ValidationError(
            "a grant scope is a key-name pattern such as 'payroll-*'", code="invalid_scope"
        )
    return scope


@dataclass(frozen=True)
class Principal:
    """Who a verified token (or a local CLI user) speaks for, and what they may do.

    ``permissions`` maps each permission to the key-name patterns it covers; ``""`` means
    every key in the realm.
    """

    subject: str
    username: str
    realm: str
    roles: tuple[str, ...]
    permissions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    token_id: str | None = None
    expires_at: float | None = None
    kind: str = "user"

    def allows(self, permission: str, key_name: str | None = None) -> bool:
        """True if the principal holds ``permission`` for ``key_name`` (None: realm-wide)."""
        scopes = self.permissions.get(permission)
        if not scopes:
            return False
        if "" in scopes:
            return True
        if key_name is None:
            return False
        return any(fnmatch.fnmatchcase(key_name, pattern) for pattern in scopes)

    def allows_any(self, permission: str) -> bool:
        """True if the principal holds ``permission`` for at least some keys."""
        return bool(self.permissions.get(permission))

    def can_act_in(self, realm: str) -> bool:
        """Own realm, or a master-realm admin acting on another realm explicitly."""
        return realm == self.realm or (self.realm == "master" and self.allows("realms:admin"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "sub": self.subject,
            "username": self.username,
            "realm": self.realm,
            "roles": list(self.roles),
            "kind": self.kind,
            "permissions": {p: sorted(s) for p, s in sorted(self.permissions.items())},
        }


def permission_map(
    grants: Iterable[tuple[str, str]], role_permissions: Mapping[str, Iterable[str]]
) -> dict[str, frozenset[str]]:
    """``{permission: scopes}`` from ``(role, scope)`` grants and each role's permissions."""
    result: dict[str, set[str]] = {}
    for role, scope in grants:
        for perm in role_permissions.get(role, ()):
            result.setdefault(perm, set()).add(scope)
    return {p: frozenset(s) for p, s in result.items()}
