"""Identity operations shared by the ``qauth`` CLI and the ``/v1/auth`` HTTP API.

Administrative functions take the caller as ``principal``: with one, the caller must act
in his own realm (or be a ``master`` realm admin), hold the operation's permission and
hand out nothing he lacks (:mod:`qimem.identity.escalation`); ``None`` is the local
operator, who holds the root key and may do anything. New passwords must pass the realm's
password policy (:mod:`qimem.identity.password_policy`), whoever sets them.

:func:`identity` is the identity layer of an :class:`~qimem.app.AppContext`, opened once on
the database its backend provides (:class:`qimem.backend.Backend`): the SQL store's own
database for ``sqlite``/``postgresql``, an in-memory SQLite database for ``memory://``
(documented in docs/plugins.md); a store without an identity layer is refused with a
``ConfigError``. Signing keys are wrapped under the root key; a ``memory://`` store without
a root key gets a random per-process one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qimem.app import AppContext
from qimem.errors import NotFoundError, ValidationError
from qimem.identity import Identity, IdentitySettings, NewSecret, Principal, TokenResponse
from qimem.identity.audit import AuditRecord
from qimem.identity.escalation import Guard
from qimem.identity.password_policy import PasswordPolicy, generate_password
from qimem.identity.permissions import validate_scope
from qimem.identity.realms import MASTER, Realm
from qimem.identity.roles import Role
from qimem.identity.users import User

GRANT_TYPES = ("password", "refresh_token", "client_credentials")


def configure(app: AppContext, settings: IdentitySettings) -> None:
    """Use ``settings`` instead of the config file's ``[identity]`` table (before first use)."""
    app.configure_identity(settings)


def identity(app: AppContext) -> Identity:
    """The identity layer of ``app``, opened on first use (:attr:`AppContext.identity`).

    :raises ConfigError: the store has no identity layer.
    """
    return app.identity


def close_identity(app: AppContext) -> None:
    """Flush the audit log and release identity's resources (the app stays open)."""
    app.close_identity()


# -- realms ---------------------------------------------------------------------------


def _actor(actor: str, principal: Principal | None) -> str:
    if principal is not None and actor == "local":
        return f"{principal.username}@{principal.realm}"
    return actor


def _guard(app: AppContext, principal: Principal | None, realm: str) -> Guard:
    return Guard(identity(app), principal, realm)


def _account_guard(
    app: AppContext, principal: Principal | None, realm: str, action: str, username: str
) -> Guard:
    """The checks of an account change: ``users:admin`` in ``realm``, and ``username``
    holds nothing the caller lacks (re-checked in the change's transaction by
    :meth:`Guard.rechecked`)."""
    guard = _guard(app, principal, realm)
    guard.needs("users:admin")
    guard.account(action, username)
    return guard


def create_realm(
    app: AppContext, name: str, *, actor: str = "local", principal: Principal | None = None
) -> Realm:
    """Create a realm (with the built-in roles and a signing key). Master admins only."""
    _guard(app, principal, MASTER).master_admin()
    return identity(app).create_realm(name, actor=_actor(actor, principal))


def list_realms(app: AppContext, *, principal: Principal | None = None) -> list[Realm]:
    """Every realm. Master admins only."""
    _guard(app, principal, MASTER).master_admin()
    return identity(app).list_realms()


def delete_realm(
    app: AppContext, name: str, *, actor: str = "local", principal: Principal | None = None
) -> None:
    """Delete a realm. Refused while it still holds keys, and for ``master``; master
    admins only."""
    ident = identity(app)
    guard = _guard(app, principal, name)
    guard.in_realm()
    guard.master_admin()
    ident.require_realm(name)
    if name != MASTER and app.store.list(name):
        from qimem.errors import ConflictError

        raise ConflictError(
            f"realm {name!r} still holds keys; it cannot be deleted", code="realm_not_empty"
        )
    ident.delete_realm(name, actor=_actor(actor, principal))


def require_realm(app: AppContext, name: str) -> None:
    """:raises NotFoundError: ``name`` is not a realm."""
    identity(app).require_realm(name)


def password_policy(app: AppContext, realm: str) -> PasswordPolicy:
    """The password policy of ``realm`` (identity settings, per-realm overrides)."""
    return identity(app).settings.password_policy.for_realm(realm)


def check_password(app: AppContext, realm: str, username: str, password: str) -> None:
    """:raises ValidationError: ``weak_password`` naming the rule ``password`` breaks."""
    password_policy(app, realm).check(password, username, realm)


def bootstrap(app: AppContext, admin_password: str | None) -> str | None:
    """Realm ``master`` and user ``admin`` (idempotent). Returns a generated password.

    A given password must pass master's password policy; it is ignored (and not checked)
    when ``admin`` already exists.
    """
    ident = identity(app)
    generated = None
    if not _has_user(ident, MASTER, "admin"):
        if admin_password is None:
            admin_password = generated = generate_password(password_policy(app, MASTER), "admin")
        else:
            check_password(app, MASTER, "admin", admin_password)
    made = ident.ensure_master(admin_password)
    return generated if made is None else made


def _has_user(ident: Identity, realm: str, username: str) -> bool:
    if not ident.realm_exists(realm):
        return False
    try:
        ident.get_user(realm, username)
    except NotFoundError:
        return False
    return True


# -- users and roles ------------------------------------------------------------------


def add_user(
    app: AppContext,
    realm: str,
    username: str,
    password: str,
    roles: Iterable[str] = (),
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> User:
    """Add a user with ``roles`` (each one the caller could grant) and a password that
    passes the realm's policy."""
    roles = list(dict.fromkeys(roles))
    guard = _guard(app, principal, realm)
    guard.needs("users:admin")
    guard.grants("user.create", username, [(r, "") for r in roles])
    identity(app).require_realm(realm)
    check_password(app, realm, username, password)
    return identity(app).add_user(realm, username, password, roles, actor=_actor(actor, principal))


def list_users(app: AppContext, realm: str, *, principal: Principal | None = None) -> list[User]:
    _guard(app, principal, realm).needs("users:admin")
    return identity(app).list_users(realm)


def set_password(
    app: AppContext,
    realm: str,
    username: str,
    password: str,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> None:
    """Set a user's password (policy-checked); not of a user holding more than the caller."""
    guard = _account_guard(app, principal, realm, "user.password", username)
    identity(app).get_user(realm, username)  # an unknown realm or user: 404 first
    check_password(app, realm, username, password)
    with guard.rechecked("user.password", username) as check:
        identity(app).set_password(
            realm, username, password, actor=_actor(actor, principal), check=check
        )


def set_user_enabled(
    app: AppContext,
    realm: str,
    username: str,
    enabled: bool,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> None:
    """Enable or disable an account; not one holding more than the caller."""
    action = "user.enable" if enabled else "user.disable"
    guard = _account_guard(app, principal, realm, action, username)
    with guard.rechecked(action, username) as check:
        identity(app).set_enabled(
            realm, username, enabled, actor=_actor(actor, principal), check=check
        )


def create_role(
    app: AppContext,
    realm: str,
    name: str,
    permissions: Iterable[str],
    description: str = "",
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> Role:
    """Create a custom role of permissions the caller holds."""
    permissions = list(permissions)
    guard = _guard(app, principal, realm)
    guard.needs("users:admin")
    guard.permissions("role.create", name, permissions)
    return identity(app).create_role(
        realm, name, permissions, description, actor=_actor(actor, principal)
    )


def list_roles(app: AppContext, realm: str, *, principal: Principal | None = None) -> list[Role]:
    _guard(app, principal, realm).needs("users:admin")
    return identity(app).list_roles(realm)


def grant_role(
    app: AppContext,
    realm: str,
    username: str,
    role: str,
    scope: str | None = None,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> bool:
    """Grant ``role`` (on key names matching ``scope``); the caller must hold the role's
    permissions at least as widely, and everything ``username`` already holds."""
    guard = _account_guard(app, principal, realm, "role.grant", username)
    guard.grants("role.grant", username, [(role, validate_scope(scope))])
    with guard.rechecked("role.grant", username) as check:
        return identity(app).grant(
            realm, username, role, scope, actor=_actor(actor, principal), check=check
        )


def revoke_role(
    app: AppContext,
    realm: str,
    username: str,
    role: str,
    scope: str | None = None,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> bool:
    """Revoke ``role`` (every scope, or just ``scope``); not from an account holding more
    than the caller."""
    guard = _account_guard(app, principal, realm, "role.revoke", username)
    with guard.rechecked("role.revoke", username) as check:
        return identity(app).revoke_role(
            realm, username, role, scope, actor=_actor(actor, principal), check=check
        )


def create_client(
    app: AppContext,
    realm: str,
    client_id: str,
    roles: Iterable[str] = (),
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> NewSecret:
    """A service account for the client_credentials grant; the secret is returned once.
    Its roles must be ones the caller could grant."""
    roles = list(dict.fromkeys(roles))
    guard = _guard(app, principal, realm)
    guard.needs("users:admin")
    guard.grants("client.create", client_id, [(r, "") for r in roles])
    return identity(app).create_client(realm, client_id, roles, actor=_actor(actor, principal))


# -- tokens ---------------------------------------------------------------------------


def token(
    app: AppContext, realm: str, params: dict[str, Any], *, source: str | None = None
) -> TokenResponse:
    """The OAuth2 token endpoint: ``grant_type`` password, refresh_token or
    client_credentials, with the standard parameter names. ``source`` is the client's
    address (login fairness: one address gets a fair share of the hashing slots).

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
        otp = params.get("otp")  # the second factor, if the user has one
        if otp is not None and not isinstance(otp, str):
            raise ValidationError("otp must be a string", code="invalid_request")
        return ident.password_grant(
            realm, need("username"), need("password"), source=source, otp=otp
        )
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


def rotate_signing_key(
    app: AppContext, realm: str, *, actor: str = "local", principal: Principal | None = None
) -> str:
    """Sign the realm's new tokens with a new key: ``realms:admin`` of that realm (or a
    master realm admin)."""
    _guard(app, principal, realm).needs("realms:admin")
    return identity(app).rotate_signing_key(realm, actor=_actor(actor, principal))


# -- audit ----------------------------------------------------------------------------


def audit_events(
    app: AppContext,
    realm: str,
    *,
    limit: int = 100,
    action: str | None = None,
    actor: str | None = None,
    principal: Principal | None = None,
) -> list[AuditRecord]:
    """Newest-first audit records of ``realm`` (``audit:read``)."""
    _guard(app, principal, realm).needs("audit:read")
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
    "check_password",
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
    "password_policy",
    "require_realm",
    "revoke",
    "revoke_role",
    "rotate_signing_key",
    "set_password",
    "set_user_enabled",
    "token",
]
