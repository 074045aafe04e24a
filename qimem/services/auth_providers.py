"""Realm login configuration, shared by ``qauth realm providers|set-providers`` and
``/v1/auth/realms/{realm}/providers``: which login providers a realm's password grant asks,
in order, their options, and how external identities map to users and roles
(:mod:`qimem.identity.providers`).

Setting it is realm administration of the deployment (it decides who may log in and with
which roles): master realm administrators only, like creating a realm. Reading it shows
secret options (a directory's service password) as ``"(set)"``.
"""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.identity.escalation import Guard
from qimem.identity.permissions import Principal
from qimem.identity.providers import RealmAuth
from qimem.identity.users import User
from qimem.services.identity import identity


def _actor(actor: str, principal: Principal | None) -> str:
    if principal is not None and actor == "local":
        return f"{principal.username}@{principal.realm}"
    return actor


def _master_admin(app: AppContext, principal: Principal | None, realm: str) -> Guard:
    guard = Guard(identity(app), principal, realm)
    guard.in_realm()
    guard.master_admin()
    return guard


def realm_providers(
    app: AppContext, realm: str, *, principal: Principal | None = None
) -> RealmAuth:
    """The login configuration of ``realm`` (password only when none was set)."""
    _master_admin(app, principal, realm)
    ident = identity(app)
    ident.require_realm(realm)
    return ident.realm_auth(realm)


def set_realm_providers(
    app: AppContext,
    realm: str,
    document: Any,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> RealmAuth:
    """Validate and store ``realm``'s login configuration; ``None`` resets it to passwords
    only. Options shown as ``"(set)"`` keep their stored value.

    :raises ValidationError: a malformed document, an unknown provider, option or role.
    """
    _master_admin(app, principal, realm)
    return identity(app).set_realm_auth(realm, document, actor=_actor(actor, principal))


def add_external_user(
    app: AppContext,
    realm: str,
    username: str,
    provider: str,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> User:
    """Provision ``username`` for the external login provider ``provider`` (no password,
    no roles: the realm's mapping gives them at each login). Needs ``users:admin`` and,
    by the no-escalation rule, the right to grant every role the provider's mapping can give
    (the account may log in with any of them): a helpdesk cannot open the door to an
    identity the mapping makes an administrator."""
    guard = Guard(identity(app), principal, realm)
    guard.needs("users:admin")
    mapped = identity(app).realm_auth(realm).roles(provider)
    guard.grants("user.add_external", username, ((role, "") for role in sorted(mapped)))
    return identity(app).add_external_user(
        realm, username, provider, actor=_actor(actor, principal)
    )
