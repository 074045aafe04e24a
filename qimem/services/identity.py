"""Identity operations shared by the ``qauth`` CLI and the ``/v1/auth`` HTTP API.

:func:`identity` opens (once per :class:`~qimem.app.AppContext`) the identity layer on the
key store's own database: the SQL store's engine for ``sqlite``/``postgresql`` stores, a
private in-memory SQLite database for ``memory://``. Signing keys are wrapped under the
root key; a ``memory://`` store without a root key gets a random per-process one.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

from qimem.app import IDENTITY_ATTR, AppContext
from qimem.errors import NotFoundError, ValidationError
from qimem.identity import Identity, IdentitySettings, NewSecret, Principal, TokenResponse
from qimem.identity.audit import AuditRecord
from qimem.identity.db import Database
from qimem.identity.realms import MASTER, Realm
from qimem.identity.roles import Role
from qimem.identity.settings import load_settings
from qimem.identity.users import User
from qimem.rootkey import ROOT_KEY_SIZE, KeyWrapper

_ATTR = IDENTITY_ATTR
_SETTINGS_ATTR = "_qimem_identity_settings"
_open_lock = threading.Lock()

GRANT_TYPES = ("password", "refresh_token", "client_credentials")


def configure(app: AppContext, settings: IdentitySettings) -> None:
    """Use ``settings`` instead of the config file's ``[identity]`` table (before first use)."""
    if _ATTR in app.__dict__:
        raise ValidationError("identity is already open for this application context")
    app.__dict__[_SETTINGS_ATTR] = settings


def identity(app: AppContext) -> Identity:
    """The identity layer of ``app``, opened on first use."""
    found = app.__dict__.get(_ATTR)
    if found is not None:
        return found
    with _open_lock:
        found = app.__dict__.get(_ATTR)
        if found is not None:
            return found
        settings = app.__dict__.get(_SETTINGS_ATTR) or load_settings(app.config.path)
        engine = getattr(app.store, "engine", None)
        database = Database.for_engine(engine) if engine is not None else Database.in_memory()
        wrapper = app.wrapper
        if wrapper is None:
            key = bytearray(os.urandom(ROOT_KEY_SIZE))
            wrapper = KeyWrapper(key)
            key[:] = bytes(ROOT_KEY_SIZE)
        found = Identity(database, wrapper, settings)
        app.__dict__[_ATTR] = found
        return found


def close_identity(app: AppContext) -> None:
    """Flush the audit log and release identity's resources (the app stays open)."""
    found = app.__dict__.pop(_ATTR, None)
    if found is not None:
        found.close()


# -- realms ---------------------------------------------------------------------------


def create_realm(app: AppContext, name: str, *, actor: str = "local") -> Realm:
    """Create a realm (with the built-in roles and a signing key)."""
    return identity(app).create_realm(name, actor=actor)


def list_realms(app: AppContext) -> list[Realm]:
    return identity(app).list_realms()


def delete_realm(app: AppContext, name: str, *, actor: str = "local") -> None:
    """Delete a realm. Refused while it still holds keys, and for ``master``."""
    ident = identity(app)
    ident.require_realm(name)
    if name != MASTER and app.store.list(name):
        from qimem.errors import ConflictError

        raise ConflictError(
            f"realm {name!r} still holds keys; it cannot be deleted", code="realm_not_empty"
        )
    ident.delete_realm(name, actor=actor)


def require_realm(app: AppContext, name: str) -> None:
    """:raises NotFoundError: ``name`` is not a realm."""
    identity(app).require_realm(name)


def bootstrap(app: AppContext, admin_password: str | None) -> str | None:
    """Realm ``master`` and user ``admin`` (idempotent). Returns a generated password."""
    return identity(app).ensure_master(admin_password)


# -- users and roles ------------------------------------------------------------------


def add_user(
    app: AppContext,
    realm: str,
    username: str,
    password: str,
    roles: Iterable[str] = (),
    *,
    actor: str = "local",
) -> User:
    return identity(app).add_user(realm, username, password, roles, actor=actor)


def list_users(app: AppContext, realm: str) -> list[User]:
    return identity(app).list_users(realm)


def set_password(
    app: AppContext, realm: str, username: str, password: str, *, actor: str = "local"
) -> None:
    identity(app).set_password(realm, username, password, actor=actor)


def set_user_enabled(
    app: AppContext, realm: str, username: str, enabled: bool, *, actor: str = "local"
) -> None:
    identity(app).set_enabled(realm, username, enabled, actor=actor)


def create_role(
    app: AppContext,
    realm: str,
    name: str,
    permissions: Iterable[str],
    description: str = "",
    *,
    actor: str = "local",
) -> Role:
    return identity(app).create_role(realm, name, permissions, description, actor=actor)


def list_roles(app: AppContext, realm: str) -> list[Role]:
    return identity(app).list_roles(realm)


def grant_role(
    app: AppContext,
    realm: str,
    username: str,
    role: str,
    scope: str | None = None,
    *,
    actor: str = "local",
) -> bool:
    return identity(app).grant(realm, username, role, scope, actor=actor)


def revoke_role(
    app: AppContext,
    realm: str,
    username: str,
    role: str,
    scope: str | None = None,
    *,
    actor: str = "local",
) -> bool:
    return identity(app).revoke_role(realm, username, role, scope, actor=actor)


def create_client(
    app: AppContext,
    realm: str,
    client_id: str,
    roles: Iterable[str] = (),
    *,
    actor: str = "local",
) -> NewSecret:
    """A service account for the client_credentials grant; the secret is returned once."""
    return identity(app).create_client(realm, client_id, roles, actor=actor)


# -- tokens ---------------------------------------------------------------------------


def token(app: AppContext, realm: str, params: dict[str, Any]) -> TokenResponse:
    """The OAuth2 token endpoint: ``grant_type`` password, refresh_token or
    client_credentials, with the standard parameter names.

    :raises ValidationError: a missing or unsupported grant type or parameter.
    :raises AuthError: bad credentials (one uniform answer per grant type).
    """
    grant = params.get("grant_type")
    if grant not in GRANT_TYPES:
        raise ValidationError(
            f"grant_type must be one of {', '.join(GRANT_TYPES)}", code="unsupported_grant_type"
        )

    def need(name: str) -> str:
        value = params.get(name)
        if not isinstance(value, str) or not value:
            raise ValidationError(f"{name} is required for grant_type={grant}")
        return value

    ident = identity(app)
    if grant == "password":
        return ident.password_grant(realm, need("username"), need("password"))
    if grant == "refresh_token":
        return ident.refresh_grant(realm, need("refresh_token"))
    return ident.client_credentials_grant(realm, need("client_id"), need("client_secret"))


def mint_token(
    app: AppContext, realm: str, username: str, *, actor: str = "local"
) -> TokenResponse:
    return identity(app).mint_token(realm, username, actor=actor)


def authenticate(app: AppContext, bearer: str) -> Principal:
    """The principal of a bearer access token. :raises AuthError: invalid/expired/revoked."""
    return identity(app).authenticate(bearer)


def revoke(app: AppContext, realm: str, token_value: str, *, actor: str | None = None) -> bool:
    return identity(app).revoke(realm, token_value, actor=actor)


def introspect(app: AppContext, realm: str, token_value: str) -> dict[str, Any]:
    return identity(app).introspect(realm, token_value)


def jwks(app: AppContext, realm: str) -> dict[str, Any]:
    return identity(app).jwks(realm)


def rotate_signing_key(app: AppContext, realm: str, *, actor: str = "local") -> str:
    return identity(app).rotate_signing_key(realm, actor=actor)


# -- audit ----------------------------------------------------------------------------


def audit_events(
    app: AppContext,
    realm: str,
    *,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
) -> list[AuditRecord]:
    return identity(app).audit_events(realm, limit=limit, action=action, actor=actor)


def audit_key_operation(
    app: AppContext,
    realm: str,
    actor: str,
    action: str,
    target: str = "-",
    outcome: str = "success",
    *,
    buffered: bool = True,
    **detail: Any,
) -> None:
    """Record a key operation (``keys.create``, ``crypto.encrypt`` ...) in the audit log.

    Buffered by default: written in batches within half a second, so auditing every
    encrypt request costs no database round trip on the request path.
    """
    identity(app).record(realm, actor, action, target, outcome, buffered=buffered, **detail)


__all__ = [
    "GRANT_TYPES",
    "NotFoundError",
    "add_user",
    "audit_events",
    "audit_key_operation",
    "authenticate",
    "bootstrap",
    "close_identity",
    "configure",
    "create_client",
    "create_realm",
    "create_role",
    "delete_realm",
    "grant_role",
    "identity",
    "introspect",
    "jwks",
    "list_realms",
    "list_roles",
    "list_users",
    "mint_token",
    "require_realm",
    "revoke",
    "revoke_role",
    "rotate_signing_key",
    "set_password",
    "set_user_enabled",
    "token",
]
