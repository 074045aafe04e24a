"""Service accounts' lifecycle, shared by ``qauth client ...`` and ``/v1/auth/realms/{realm}/
clients``: list, show, disable, enable, rotate-secret, delete (``create`` is
:func:`qimem.services.identity.create_client`).

The permissions are the users' (:mod:`qimem.services.identity`): ``users:admin`` in the
realm (another realm does not exist for the caller: 404), and never on an account holding
a permission the caller lacks (:mod:`qimem.identity.escalation`, re-checked under the
account's row lock, refusals audited as ``denied``). A service account acting on itself is
no special case: it needs ``users:admin`` like anyone else, and then holds nothing it lacks
(docs/identity.md, "Service accounts"). ``None`` as principal is the local operator.
"""

from __future__ import annotations

from typing import Any

from qimem.app import AppContext
from qimem.identity import NewSecret, Principal
from qimem.identity.clients import DEFAULT_OVERLAP, client_dict, parse_overlap
from qimem.identity.users import User
from qimem.services.identity import _account_guard, _actor, _guard, identity


def list_clients(app: AppContext, realm: str, *, principal: Principal | None = None) -> list[User]:
    """The realm's service accounts (``users:admin``)."""
    _guard(app, principal, realm).needs("users:admin")
    return identity(app).list_users(realm, "client")


def show_client(
    app: AppContext, realm: str, client_id: str, *, principal: Principal | None = None
) -> dict[str, Any]:
    """A service account with its roles and when its previous secrets expire."""
    _guard(app, principal, realm).needs("users:admin")
    user, previous = identity(app).get_client(realm, client_id)
    return client_dict(user, previous)


def _checked(
    app: AppContext, realm: str, client_id: str, action: str, principal: Principal | None
) -> Any:
    """The guard of a change to ``client_id``: permission and realm first, then 404 for a
    name that is not a service account, then the no-escalation check."""
    guard = _guard(app, principal, realm)
    guard.needs("users:admin")
    identity(app).require_client(realm, client_id)
    return _account_guard(app, principal, realm, action, client_id)


def set_client_enabled(
    app: AppContext,
    realm: str,
    client_id: str,
    enabled: bool,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> dict[str, Any]:
    """Disable (its tokens stop working at once) or enable (new tokens only)."""
    action = "client.enable" if enabled else "client.disable"
    guard = _checked(app, realm, client_id, action, principal)
    with guard.rechecked(action, client_id) as check:
        identity(app).set_client_enabled(
            realm, client_id, enabled, actor=_actor(actor, principal), check=check
        )
    return show_client(app, realm, client_id)


def rotate_client_secret(
    app: AppContext,
    realm: str,
    client_id: str,
    overlap: str | int | None = None,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> NewSecret:
    """A new secret (returned once); the old one stays valid for ``overlap`` (a duration:
    default one hour; 0: invalid at once, and the account's tokens are cut off)."""
    seconds = parse_overlap(overlap)
    guard = _checked(app, realm, client_id, "client.rotate_secret", principal)
    with guard.rechecked("client.rotate_secret", client_id) as check:
        return identity(app).rotate_client_secret(
            realm, client_id, seconds, actor=_actor(actor, principal), check=check
        )


def delete_client(
    app: AppContext,
    realm: str,
    client_id: str,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> None:
    """Delete the service account; its tokens stop working at once."""
    guard = _checked(app, realm, client_id, "client.delete", principal)
    with guard.rechecked("client.delete", client_id) as check:
        identity(app).delete_client(realm, client_id, actor=_actor(actor, principal), check=check)


__all__ = [
    "DEFAULT_OVERLAP",
    "delete_client",
    "list_clients",
    "rotate_client_secret",
    "set_client_enabled",
    "show_client",
]
