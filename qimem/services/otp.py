"""The second factor (TOTP) of password users, shared by ``qauth otp ...`` and
``/v1/auth/realms/{realm}/users/{username}/otp`` (:mod:`qimem.identity.otp`).

Who may: a user on his own account (a token of that very user); anyone else needs
``users:admin`` in the realm and may not act on an account holding a permission he lacks
(no escalation: a helpdesk cannot remove an administrator's second factor). A user removing
his own second factor must give a current code (or a recovery code), and one enrolling
his own must give his current password; an administrator need neither. The realm's
"required" policy is ``realms:admin`` of that realm. ``None`` as principal is the local
operator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from qimem.app import AppContext
from qimem.identity import Principal
from qimem.identity.base import AccountCheck
from qimem.identity.otp import Enrollment
from qimem.services.identity import _account_guard, _actor, _guard, identity


def _is_self(app: AppContext, principal: Principal | None, realm: str, username: str) -> bool:
    if principal is None or principal.realm != realm or principal.kind != "user":
        return False
    return principal.username == username and (
        identity(app).get_user(realm, username).user_id == principal.subject
    )


@contextlib.contextmanager
def _allowed(
    app: AppContext, principal: Principal | None, realm: str, action: str, username: str
) -> Iterator[AccountCheck | None]:
    """The check of an OTP change: none for the user himself, else ``users:admin`` and no
    escalation (re-checked in the change's transaction)."""
    if _is_self(app, principal, realm, username):
        yield None
        return
    guard = _account_guard(app, principal, realm, action, username)
    with guard.rechecked(action, username) as check:
        yield check


def otp_status(
    app: AppContext, realm: str, username: str, *, principal: Principal | None = None
) -> dict[str, Any]:
    """Whether ``username`` has a (confirmed) second factor, and recovery codes left."""
    if not _is_self(app, principal, realm, username):
        _guard(app, principal, realm).needs("users:admin")
    return identity(app).otp_status(realm, username)


def otp_enroll(
    app: AppContext,
    realm: str,
    username: str,
    *,
    password: str | None = None,
    source: str | None = None,
    actor: str = "local",
    principal: Principal | None = None,
) -> Enrollment:
    """A new TOTP secret for ``username`` (shown once; active after :func:`otp_confirm`).

    A user enrolling his own second factor must give his current ``password`` (a fresh
    proof, as Keycloak re-authenticates before a credential is set up): with a stolen
    access token alone, an attacker could enroll a factor of his own and lock the owner
    out. An administrator (``users:admin``) enrolling someone else needs none.

    :raises ForbiddenError: ``password_required`` (missing or wrong; counted for lockout).
    """
    if _is_self(app, principal, realm, username):
        identity(app).prove_password(realm, username, password, action="otp.enroll", source=source)
    with _allowed(app, principal, realm, "otp.enroll", username) as check:
        return identity(app).otp_enroll(
            realm, username, actor=_actor(actor, principal), check=check
        )


def otp_confirm(
    app: AppContext,
    realm: str,
    username: str,
    code: str,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> list[str]:
    """Activate the pending secret with a first right code; the 10 recovery codes."""
    with _allowed(app, principal, realm, "otp.confirm", username) as check:
        return identity(app).otp_confirm(
            realm, username, code, actor=_actor(actor, principal), check=check
        )


def otp_disable(
    app: AppContext,
    realm: str,
    username: str,
    code: str | None = None,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> None:
    """Remove ``username``'s second factor. The user himself must give a right ``code``."""
    own = _is_self(app, principal, realm, username)
    if own and not code:
        from qimem.errors import ValidationError

        raise ValidationError(
            "removing your own second factor needs a current code", code="invalid_otp"
        )
    with _allowed(app, principal, realm, "otp.disable", username) as check:
        identity(app).otp_disable(
            realm,
            username,
            code=code if own else None,
            actor=_actor(actor, principal),
            check=check,
        )


def set_otp_required(
    app: AppContext,
    realm: str,
    required: bool,
    *,
    actor: str = "local",
    principal: Principal | None = None,
) -> dict[str, Any]:
    """Require (or not) a second factor of the realm's password users (``realms:admin``)."""
    _guard(app, principal, realm).needs("realms:admin")
    identity(app).set_otp_required(realm, required, actor=_actor(actor, principal))
    return {"realm": realm, "otp_required": required}


def otp_policy(
    app: AppContext, realm: str, *, principal: Principal | None = None
) -> dict[str, Any]:
    """The realm's second-factor policy (``users:admin``)."""
    _guard(app, principal, realm).needs("users:admin")
    identity(app).require_realm(realm)
    return {"realm": realm, "otp_required": identity(app).otp_required(realm)}


__all__ = [
    "otp_confirm",
    "otp_disable",
    "otp_enroll",
    "otp_policy",
    "otp_status",
    "set_otp_required",
]
