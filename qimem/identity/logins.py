"""Logins: the OAuth2 grants (password, refresh_token, client_credentials) and the local
operator's password-less token.

Database work runs in short transactions; Argon2 and signing run outside them. Every
refusal of one grant type is the same :class:`~qimem.errors.AuthError` (nothing tells an
attacker which check failed); the reason is in the audit log.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from qimem.errors import AuthError, ForbiddenError, QimemError, ValidationError
from qimem.identity import lockout, realms, refresh, roles, users
from qimem.identity.clients import secret_matches, secret_sealer
from qimem.identity.login_providers import ProviderLogins
from qimem.identity.otp import ENROLLMENT_REQUIRED, OTP_FAILURES, OtpAdministration
from qimem.identity.providers import RealmAuth, external_marker
from qimem.identity.tokens import lock_and_read_user_row, lock_user_row
from qimem.identity.users import User

_BAD_LOGIN = "invalid username or password"
_BAD_CLIENT = "invalid client credentials"
_BAD_REFRESH = "invalid or expired refresh token"
#: The account a refused client_credentials grant checks when the name has none (no row
#: has this id: user ids are random UUIDs, version 4).
_DECOY_CLIENT_ID = "00000000-0000-0000-0000-000000000000"
_DECOY_SECRET_HASH = "sha256$" + "0" * 64  # noqa: S105 (matches no secret: a decoy)


def _decoy_client(realm: str) -> User:
    """The decoy service account of a refused client_credentials grant."""
    return User(_DECOY_CLIENT_ID, str(realm), "-", "client", True, 0, 0.0, 0.0, _DECOY_SECRET_HASH)


def _nameable(name: object) -> bool:
    """Whether ``name`` can name a realm or an account at all: a string of at most 128
    characters without NUL (which no name holds, and PostgreSQL cannot even be sent)."""
    return isinstance(name, str) and len(name) <= 128 and "\x00" not in name


def _login_error() -> AuthError:
    return AuthError(_BAD_LOGIN, code="invalid_grant")


@dataclass(frozen=True)
class TokenResponse:
    """An OAuth2 token response. Its repr shows no token."""

    access_token: str = field(repr=False)
    expires_in: int
    realm: str
    subject: str
    refresh_token: str | None = field(default=None, repr=False)
    refresh_expires_in: int | None = None
    token_type: str = "Bearer"  # noqa: S105 (the OAuth token type name, not a secret)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "access_token": self.access_token,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
        }
        if self.refresh_token is not None:
            body["refresh_token"] = self.refresh_token
            body["refresh_expires_in"] = self.refresh_expires_in
        return body


class Logins(ProviderLogins, OtpAdministration):
    """The token endpoint's grants (the password grant through the realm's login
    providers: :class:`~qimem.identity.login_providers.ProviderLogins`)."""

    def _respond(
        self,
        realm: str,
        user: User,
        grants: list[tuple[str, str]],
        now: float | None = None,
        refresh_token: tuple[str, int] | None = None,
    ) -> TokenResponse:
        """Sign an access token for ``user`` with ``grants``; ``refresh_token`` is a new
        refresh token and its lifetime, if the grant gives one."""
        unscoped = {r for r, s in grants if s == ""}
        scoped: dict[str, list[str]] = {}
        for r, s in grants:
            if s and r not in unscoped:
                scoped.setdefault(r, []).append(s)
        access = self.tokens.issue(
            realm,
            user.user_id,
            user.username,
            {r for r, _ in grants},
            scoped=scoped,
            kind=user.kind,
            now=now,
        )
        rtoken, rexpires = refresh_token or (None, None)
        return TokenResponse(
            access.token, self.settings.access_token_ttl, realm, user.user_id, rtoken, rexpires
        )

    def _session(
        self, conn: Connection, realm: str, user: User, now: float, **family: Any
    ) -> tuple[list[tuple[str, str]], str, float]:
        """The user's grants and a new refresh token issued at ``now`` (``family``:
        :func:`refresh.issue`'s family or session arguments), in the login's transaction."""
        grants = roles.grants_of(conn, self.sealer, realm, user.user_id)
        rtoken, rexp = refresh.issue(
            conn,
            self.refresh_hasher,
            realm,
            user.user_id,
            self.settings.refresh_token_ttl,
            now=now,
            **family,
        )
        return grants, rtoken, rexp

    def password_grant(
        self,
        realm: str,
        username: str,
        password: str,
        *,
        source: str | None = None,
        otp: str | None = None,
    ) -> TokenResponse:
        """Log in with a username and password through the realm's provider chain: access +
        refresh token, one uniform 401, or 503 when a provider could not decide.

        ``otp``: the second factor (a TOTP code or a recovery code) of a user who has one
        (:mod:`qimem.identity.otp`); checked after the password, before the lockout state
        is claimed, and a wrong or missing one is the same counted 401 as a wrong password.

        ``source`` is the client's address: one address (and one account) gets at most a
        fair share of the hashing slots (:class:`PasswordHashing`), else 503 ``login_busy``.

        The outcome is decided atomically with the lock state after the providers answered
        (:func:`lockout.claim`, :func:`lockout.record_failure`): a login that was
        checking while another failure locked the user fails. One lockout counter per qimem
        user, whichever provider refused.
        """
        if not isinstance(username, str) or not isinstance(password, str):
            raise _login_error()
        known_realm, user, config = False, None, RealmAuth()
        if _nameable(realm):
            with self.db.read() as conn:  # the realm, the user, the login configuration
                known_realm, row, blob = realms.login_view(
                    conn, realm, username if _nameable(username) else None
                )
            user = users.user_of(row) if row is not None else None
            config = self.realm_auth_of(realm, blob)  # None (no realm): password only
        if user is not None and user.kind != "user":
            user = None
        locked = user is not None and lockout.is_locked(user.locked_until)
        found, provider_name, unavailable = self._ask_providers(
            realm, username, password, source, config, user, locked
        )
        reason: str | None = None
        if found is None:
            if unavailable is not None and not locked:
                reason = "provider_unavailable"
            elif user is None:
                reason = "unknown_user"
            elif not self.sealer.user_ok(user):
                reason = "integrity"
            elif locked:
                reason = "locked"
            else:
                reason = "bad_password"
        elif found.username != username:
            reason = "bad_identity"  # a provider may not log a user in under another name
        elif found.local:
            if user is None or user.secret_hash != found.verified_hash:
                reason = "changed"
            elif not self.sealer.user_ok(user):
                reason = "integrity"
            elif locked:
                reason = "locked"
            elif not user.enabled:
                reason = "disabled"
        elif user is not None:
            if user.secret_hash != external_marker(provider_name):
                reason = "local_account_conflict"  # never take over another owner's account
            elif not self.sealer.user_ok(user):
                reason = "integrity"
            elif locked:
                reason = "locked"
            elif not user.enabled:
                reason = "disabled"
        elif not config.mapping_for(provider_name, found.issuer).jit_users:
            reason = "not_provisioned"
        with self.db.begin() as conn:
            if reason is None:
                assert found is not None
                if user is None:  # just-in-time creation of an external identity's user
                    try:
                        user = users.create(
                            conn,
                            self.sealer,
                            realm,
                            username,
                            external_marker(provider_name),
                            "user",
                        )
                    except QimemError:
                        reason = "not_provisioned"
                if user is not None and reason is None:
                    reason = self.second_factor(conn, realm, user, otp)
                if user is not None and reason is None:
                    verified = found.verified_hash or external_marker(provider_name)
                    reason, now_row = lockout.claim(conn, user.user_id, verified)
                    if reason is None and (now_row is None or not self.sealer.user_ok(now_row)):
                        reason = "integrity"  # changed without the root key while checking
            if reason is not None:
                self._login_failed(
                    conn, realm, known_realm, user, reason, source, provider_name, config
                )
            else:
                assert user is not None and found is not None
                issued_at = time.time()  # under the row lock lockout.claim took
                if found.new_hash is not None:
                    users.set_secret_hash(conn, user.user_id, found.new_hash)
                    users.reseal(conn, self.sealer, user.user_id)
                if not found.local:
                    mapping = config.mapping_for(provider_name, found.issuer)
                    issued_at = max(issued_at, self._sync_roles(conn, realm, user, found, mapping))
                grants, rtoken, rexp = self._session(
                    conn, realm, user, issued_at, session_max=self.settings.session_max_seconds
                )
                self.audit.record(
                    realm,
                    user.username,
                    "login",
                    user.username,
                    conn=conn,
                    grant="password",
                    provider=provider_name,
                    rehashed=bool(found.new_hash) or None,
                    source=source,
                )
        if reason == "provider_unavailable":
            assert unavailable is not None
            raise unavailable
        if reason == ENROLLMENT_REQUIRED:  # only after the password was verified
            raise AuthError(
                "this realm requires a second factor (TOTP) and this account has none; "
                "an administrator must enroll it (qauth otp enroll)",
                code=ENROLLMENT_REQUIRED,
            )
        if reason is not None:
            raise _login_error()
        assert user is not None
        return self._respond(realm, user, grants, issued_at, (rtoken, int(rexp - issued_at)))

    def _login_failed(
        self,
        conn: Connection,
        realm: str,
        known_realm: bool,
        user: User | None,
        reason: str,
        source: str | None,
        provider: str | None = None,
        config: RealmAuth | None = None,
    ) -> None:
        """Count (wrong credentials) and audit a failed password login."""
        if not known_realm:
            return
        locked_now = False
        if (reason == "bad_password" or reason in OTP_FAILURES) and user is not None:
            counted = lockout.record_failure(conn, user.user_id, self.settings)
            locked_now = counted == "locked_now"
            if counted == "locked":
                reason = "locked"
        self.audit.record(
            realm,
            user.username if user else "(unknown)",
            "login",
            user.username if user else "-",
            "failure",
            conn=conn,
            reason=reason,
            provider=provider if reason not in ("bad_password", "unknown_user") else None,
            chain=list(config.providers) if config is not None else None,
            locked=locked_now or None,
            source=source,
        )

    def refresh_grant(self, realm: str, token: str) -> TokenResponse:
        """Trade a refresh token for new tokens; a reused one revokes its family.

        The user's row is write-locked before the token, the account and its grants are
        (re-)read, and the new tokens' issue time is taken under that lock: a disable, a
        password change or a role revoke committing concurrently either comes first (and is
        seen) or cuts off the tokens issued here (finding 8, RT-3)."""
        failure: str | None = None
        user: User | None = None
        with self.db.begin() as conn:
            record = refresh.find(conn, self.refresh_hasher, token)
            if record is not None and record.realm == realm:
                lock_user_row(conn, record.user_id)
                record = refresh.find(conn, self.refresh_hasher, token)
            now = time.time()  # under the row lock
            if record is None or record.realm != realm:
                failure = "unknown"
            elif record.revoked or record.expires_at < now or record.family_expires_at < now:
                failure = "revoked" if record.revoked else "expired"
            elif record.used or not refresh.mark_used(conn, record):
                refresh.revoke_family(conn, record.family_id)
                failure = "reuse"
            else:
                user = users.by_id(conn, record.user_id)
                if user is None or not user.enabled or not self.sealer.user_ok(user):
                    refresh.revoke_family(conn, record.family_id)
                    failure = "disabled"
                elif record.cut_off(user.tokens_valid_after):
                    refresh.revoke_family(conn, record.family_id)
                    failure = "cut_off"
            if failure is not None:
                if user is None and record is not None:
                    user = users.by_id(conn, record.user_id)
                if isinstance(realm, str) and realms.exists(conn, realm):
                    self.audit.record(
                        realm,
                        user.username if user else "(unknown)",
                        "token.refresh",
                        "-",
                        "failure",
                        conn=conn,
                        reason=failure,
                    )
            else:
                assert record is not None and user is not None
                grants, rtoken, rexp = self._session(
                    conn,
                    realm,
                    user,
                    now,
                    family_id=record.family_id,
                    family_expires_at=record.family_expires_at,
                )
                self.audit.record(realm, user.username, "token.refresh", user.username, conn=conn)
        if failure is not None:
            raise AuthError(_BAD_REFRESH, code="invalid_grant")
        assert user is not None
        return self._respond(realm, user, grants, now, (rtoken, int(rexp - now)))

    def client_credentials_grant(self, realm: str, client_id: str, secret: str) -> TokenResponse:
        """A service account's access token (no refresh token, as OAuth2 recommends).

        After the secret is verified, the account's row is write-locked and re-read, and
        the token's issue time taken under that lock (as the password grant does): a
        disable or role revoke committing concurrently is seen or cuts the token off.

        Every refusal does the same work, whatever the name (red team, issue 15): an
        unknown client id, a disabled client or a user's name goes through the same
        statements (the row lock, the re-read, the previous secrets) and the same MAC and
        secret-hash work, against a decoy account that matches no secret, so the answer's
        time does not tell which client ids exist."""
        known_realm, user = False, None
        if _nameable(realm):
            with self.db.read() as conn:  # the realm and the account in one read
                known_realm, row, _ = realms.login_view(
                    conn,
                    realm,
                    client_id if _nameable(client_id) else None,
                )
            user = users.user_of(row) if row is not None else None
        if user is not None and (user.kind != "client" or not known_realm):
            user = None
        candidate = user if user is not None and user.enabled else None
        # The MAC is checked the same way for the decoy (no integrity report for it).
        ok = self._user_mac_ok(candidate or _decoy_client(realm)) and candidate is not None
        grants: list[tuple[str, str]] = []
        with self.db.begin() as conn:
            # The secret is checked under the row lock, against the current secret and the
            # previous ones still in their rotation overlap (qimem.identity.clients).
            # Lock and re-read in one statement; the decoy's id matches no row, so a refusal
            # sends the same statement.
            locked = lock_and_read_user_row(
                conn, candidate.user_id if candidate else _DECOY_CLIENT_ID
            )
            issued_at = time.time()  # under the row lock
            now_row = users.user_of(locked) if locked is not None else None
            checked = now_row if now_row is not None and ok else _decoy_client(realm)
            mac_ok = self._user_mac_ok(checked)
            matched = secret_matches(conn, secret_sealer(self), checked, secret, issued_at)
            ok = (
                ok
                and now_row is not None
                and now_row.enabled
                and now_row.kind == "client"
                and mac_ok
                and matched is not None
            )
            if ok:
                assert user is not None
                grants = roles.grants_of(conn, self.sealer, realm, user.user_id)
                self.audit.record(
                    realm,
                    user.username,
                    "login",
                    user.username,
                    conn=conn,
                    grant="client_credentials",
                )
            elif known_realm:
                self.audit.record(
                    realm,
                    user.username if user else "(unknown)",
                    "login",
                    "-",
                    "failure",
                    conn=conn,
                    grant="client_credentials",
                )
        if not ok or user is None:
            raise AuthError(_BAD_CLIENT, code="invalid_client")
        return self._respond(realm, user, grants, issued_at)

    def _user_mac_ok(self, user: User) -> bool:
        """``user``'s MAC is right: :meth:`Sealer.user_ok` for a real row (a wrong MAC is
        reported), the same HMAC work for the decoy (never reported, never right)."""
        if user.user_id == _DECOY_CLIENT_ID:
            return hmac.compare_digest(self.sealer.user_mac(user), "-" * 64) and False
        return bool(self.sealer.user_ok(user))

    def prove_password(
        self, realm: str, username: str, password: Any, *, action: str, source: str | None = None
    ) -> None:
        """A fresh proof before a credential change by the user himself (enrolling his own
        second factor): ``password`` is his current password, checked by the realm's login
        providers as at login (Argon2id for a local user, his directory for an LDAP one).

        A stolen access token is not enough to lock the owner out. A wrong password counts
        towards the lockout (the endpoint is no guessing oracle) and is audited as a
        failure of ``action``; a locked, disabled or tampered account is refused.

        :raises ForbiddenError: ``password_required`` (missing or wrong, the same answer).
        :raises ProviderUnavailableError: the user's directory cannot decide.
        """
        refused = ForbiddenError(
            "this change needs your current password (a fresh proof that you are you)",
            code="password_required",
        )
        if not isinstance(password, str) or not password or not isinstance(username, str):
            raise refused
        with self.db.begin() as conn:
            user = users.find(conn, realm, username) if realms.exists(conn, realm) else None
            config = self.realm_auth(realm, conn) if user is not None else RealmAuth()
        if user is None or user.kind != "user":
            raise refused
        locked = lockout.is_locked(user.locked_until)
        found, provider, unavailable = self._ask_providers(
            realm, username, password, source, config, user, locked
        )
        reason: str | None = None
        if found is None:
            if unavailable is not None and not locked:
                raise unavailable
            reason = "locked" if locked else "bad_password"
        elif found.username != username or (
            found.verified_hash != user.secret_hash
            if found.local
            else user.secret_hash != external_marker(provider)
        ):
            reason = "bad_identity"
        elif locked or not user.enabled or not self.sealer.user_ok(user):
            reason = "locked" if locked else "disabled"
        if reason is None:
            return
        with self.db.begin() as conn:
            if reason == "bad_password":
                lockout.record_failure(conn, user.user_id, self.settings)
            self.audit.record(
                realm,
                username,
                action,
                username,
                "failure",
                conn=conn,
                reason=reason,
                source=source,
            )
        raise refused

    def mint_token(self, realm: str, username: str, *, actor: str = "local") -> TokenResponse:
        """An access token for ``username`` without a password: for the local operator,
        who holds the root key and the database anyway (``qauth token``)."""
        with self.db.begin() as conn:
            user = self._load_user(conn, realm, username)
        if not user.enabled:
            raise ValidationError(f"user {username!r} is disabled")
        response = self._respond(realm, user, list(user.grants))
        self.audit.record(realm, actor, "token.issue", username)
        return response
