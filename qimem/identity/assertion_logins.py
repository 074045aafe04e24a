"""Logins with an external signed assertion (a JWT from Vault, Kubernetes, a CI system ...):
the token endpoint's ``jwt-bearer`` (RFC 7523) and token-exchange (RFC 8693) grants.

A login provider takes part when it has, besides ``authenticate``, the method
``authenticate_assertion(attempt) -> Authenticated | None`` (the assertion is
``attempt.password``; ``attempt.username`` is empty: the identity comes from the
assertion). It returns :class:`~qimem.identity.providers.Authenticated` naming the qimem
username, raises :class:`AssertionRejected` with a short reason (audited, never shown), or
:class:`~qimem.identity.providers.ProviderUnavailableError` when it cannot decide (the
issuer's keys cannot be fetched: 503). The realm's chain is asked in order; the first yes
wins.

:func:`assertion_grant` does the rest, as the password grant does: the realm's mapping
(claims and groups to roles, just-in-time users), an external identity never logs in as a
local user or another provider's user, a locked or disabled user is refused, one uniform 401
(``invalid_grant``) for every refusal, and an audit record naming the provider, the
grant and the reason. No refresh token is issued: the client presents a fresh assertion.
Failures are not counted for lockout (no secret is guessed; a forged token fails its
signature).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from qimem.errors import AuthError, QimemError, StoreUnavailableError
from qimem.identity import lockout, realms, roles, users
from qimem.identity.logins import Logins, TokenResponse
from qimem.identity.providers import (
    Authenticated,
    LoginAttempt,
    ProviderUnavailableError,
    RealmAuth,
    RoleMapping,
    external_marker,
)
from qimem.identity.users import User

log = logging.getLogger("qimem.identity")

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a grant type URN, not a password
_BAD_ASSERTION = "invalid or unacceptable assertion"


class AssertionRejected(Exception):  # noqa: N818 (a provider's "no", with its reason)
    """A provider's refusal of an assertion; ``reason`` goes to the audit log only."""

    def __init__(self, reason: str, issuer: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.issuer = issuer


def _refusal() -> AuthError:
    return AuthError(_BAD_ASSERTION, code="invalid_grant")


def _ask_assertion(
    ident: Logins, realm: str, assertion: str, source: str | None, config: RealmAuth
) -> tuple[Authenticated | None, str | None, str | None, str | None, Exception | None]:
    """(identity, provider, refusal reason, issuer, unavailability) from the chain."""
    reason: str | None = "no_assertion_provider"
    name: str | None = None
    issuer: str | None = None
    unavailable: Exception | None = None
    for candidate in config.providers:
        provider = ident._provider(candidate)
        check = getattr(provider, "authenticate_assertion", None)
        if not callable(check):
            continue
        name = candidate
        attempt = LoginAttempt(realm, "", assertion, source, config.options.get(candidate, {}))
        try:
            found = check(attempt)
        except AssertionRejected as exc:
            reason, issuer = exc.reason[:64], exc.issuer
            continue
        except ProviderUnavailableError as exc:
            unavailable = exc
            continue
        except (AuthError, StoreUnavailableError):
            raise
        except Exception as exc:
            log.warning(
                "login provider %r failed: %s (treated as unavailable)",
                candidate,
                type(exc).__name__,
            )
            unavailable = ProviderUnavailableError(
                f"the login provider {candidate!r} failed; retry later"
            )
            continue
        if isinstance(found, Authenticated) and not found.local:
            issuer = found.issuer or str(found.claims.get("iss", "")) or None
            return found, candidate, None, issuer, None
        reason = "invalid_token"
    return None, name, reason, issuer, unavailable


def _check_account(
    ident: Logins, user: User | None, provider: str, mapping: RoleMapping
) -> str | None:
    """Why the external identity may not log in as ``user`` (None: it may); ``mapping``
    is its provider's (or its issuer's)."""
    if user is None:
        return None if mapping.jit_users else "not_provisioned"
    if user.kind != "user" or user.secret_hash != external_marker(provider):
        return "local_account_conflict"  # never another owner's (or a local) account
    if not ident.sealer.user_ok(user):
        return "integrity"
    if lockout.is_locked(user.locked_until):
        return "locked"
    return None if user.enabled else "disabled"


def assertion_grant(
    ident: Logins,
    realm: str,
    assertion: str,
    *,
    grant: str = "jwt-bearer",
    source: str | None = None,
) -> TokenResponse:
    """Swap an external assertion for an access token of ``realm`` (no refresh token),
    through the realm's login providers and mapping on the identity ``ident``.

    :raises AuthError: ``invalid_grant``, whatever the reason (audited).
    :raises ProviderUnavailableError: no provider accepted and one could not decide.
    """
    if not isinstance(realm, str) or not isinstance(assertion, str):
        raise _refusal()
    with ident.db.begin() as conn:
        known_realm = realms.exists(conn, realm)
        config = ident.realm_auth(realm, conn) if known_realm else RealmAuth()
    found, name, reason, issuer, unavailable = (
        _ask_assertion(ident, realm, assertion, source, config)
        if known_realm
        else (None, None, "unknown_realm", None, None)
    )
    user: User | None = None
    # Only the issuer the provider vouches for (Authenticated.issuer) selects a mapping.
    mapping = config.mapping_for(name, found.issuer) if found is not None else RoleMapping()
    if found is not None:
        assert name is not None
        if len(found.username) > 128:
            reason = "bad_username"
        else:
            with ident.db.begin() as conn:
                user = users.find(conn, realm, found.username)
            reason = _check_account(ident, user, name, mapping)
    elif unavailable is not None:
        reason = "provider_unavailable"
    grants: list[tuple[str, str]] = []
    issued_at = 0.0
    with ident.db.begin() as conn:
        if reason is None:
            assert found is not None and name is not None
            if user is None:  # just-in-time creation
                try:
                    user = users.create(
                        conn, ident.sealer, realm, found.username, external_marker(name), "user"
                    )
                except QimemError:  # made meanwhile by a concurrent first login?
                    user = users.find(conn, realm, found.username)
                    reason = _check_account(ident, user, name, mapping) if user else "conflict"
            second = ident._otp_row(conn, user) if user is not None and reason is None else None
            if second is not None and second.confirmed:
                # An assertion cannot carry the code: an account with an active second
                # factor never logs in without it (fail closed, not a bypass).
                reason = "second_factor_required"
            if user is not None and reason is None:
                reason, now_row = lockout.claim(conn, user.user_id, external_marker(name))
                if reason is None and (now_row is None or not ident.sealer.user_ok(now_row)):
                    reason = "integrity"
        if reason is None:
            assert user is not None and found is not None
            issued_at = max(time.time(), ident._sync_roles(conn, realm, user, found, mapping))
            grants = roles.grants_of(conn, ident.sealer, realm, user.user_id)
            _audit_login(ident, realm, conn, user.username, "success", grant, name, issuer, source)
        elif known_realm:
            who = user.username if user else (found.username if found else "(unknown)")
            _audit_login(
                ident, realm, conn, who, "failure", grant, name, issuer, source, reason=reason
            )
    if reason == "provider_unavailable":
        assert unavailable is not None
        raise unavailable
    if reason is not None:
        raise _refusal()
    assert user is not None
    return ident._respond(realm, user, grants, issued_at)


def _audit_login(
    ident: Logins,
    realm: str,
    conn: Any,
    who: str,
    outcome: str,
    grant: str,
    provider: str | None,
    issuer: str | None,
    source: str | None,
    *,
    reason: str | None = None,
) -> None:
    ident.audit.record(
        realm,
        who[:200],
        "login",
        who[:200] if outcome == "success" else "-",
        outcome,
        conn=conn,
        grant=grant,
        provider=provider,
        issuer=issuer[:200] if issuer else None,
        reason=reason,
        source=source,
    )
