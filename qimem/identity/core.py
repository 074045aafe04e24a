"""The identity facade: realms, users, roles, service accounts, logins and tokens.

One :class:`Identity` per application context; it is thread-safe. Database work runs in
short transactions; Argon2 and signing run outside them, so a slow hash never holds a lock.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from qimem.errors import AuthError, ConflictError, NotFoundError, ValidationError
from qimem.identity import lockout, realms, refresh, roles, users
from qimem.identity.audit import AuditLog, AuditRecord
from qimem.identity.authz_mac import Reports, Sealer, seal_legacy_rows
from qimem.identity.db import Database
from qimem.identity.passwords import (
    PasswordHashing,
    generate_password,
    hash_client_secret,
    new_client_secret,
    validate_password,
    verify_client_secret,
)
from qimem.identity.permissions import Principal, permission_map
from qimem.identity.realms import MASTER, Realm
from qimem.identity.roles import Role
from qimem.identity.settings import IdentitySettings
from qimem.identity.tokens import (
    AccessToken,
    TokenService,
    create_signing_key,
    invalid_token,
    issued_ms,
)
from qimem.identity.users import User
from qimem.rootkey import KeyWrapper

_BAD_LOGIN = "invalid username or password"
_VERIFIED_MAX = 10_000
_BAD_CLIENT = "invalid client credentials"
_BAD_REFRESH = "invalid or expired refresh token"


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


@dataclass(frozen=True)
class NewSecret:
    """A just-created account and its one-time secret (shown once, never stored)."""

    user: User
    secret: str = field(repr=False)


class Identity:
    """Identity and access for one qimem deployment (one database)."""

    def __init__(
        self, database: Database, wrapper: KeyWrapper, settings: IdentitySettings | None = None
    ) -> None:
        self.settings = settings or IdentitySettings()
        self.db = database
        self._wrapper = wrapper
        self.hashing = PasswordHashing(self.settings)
        self.tokens = TokenService(database, wrapper, self.settings)
        self.audit = AuditLog(database)
        self.sealer = Sealer(wrapper, Reports(self._integrity_violation))
        with database.begin() as conn:
            sealed = seal_legacy_rows(conn, self.sealer)
            if sealed:
                self.audit.record(
                    MASTER,
                    "init",
                    "integrity.seal",
                    "-",
                    conn=conn,
                    users=sealed["users"],
                    roles=sealed["roles"],
                    grants=sealed["grants"],
                )
        self._role_cache: dict[str, tuple[float, dict[str, tuple[str, ...]]]] = {}
        self._verified: dict[str, tuple[Principal, float, int]] = {}
        self._lock = threading.Lock()
        atexit.register(self.audit.close)

    def _integrity_violation(self, realm: str, table: str, what: str) -> None:
        self.audit.record(
            realm[:64],
            "integrity",
            "integrity.violation",
            what[:200],
            "failure",
            buffered=True,
            table=table,
        )

    def _intact(self, user: User) -> User:
        """:raises ConflictError: the user's row fails its MAC (nothing is changed)."""
        if not self.sealer.user_ok(user):
            raise ConflictError(
                f"the stored record of {user.username!r} fails its integrity check (written "
                "without the root key?); it is ignored, see the audit log",
                code="integrity_violation",
            )
        return user

    def _cut_off(self, conn: Connection, user: User, keep: list[tuple[str, str]] | None) -> None:
        """Cut off the user's tokens (finding 8) and re-seal his row and his grants that
        were authentic (``keep``, else all that verify now) under the new cut-off."""
        valid = (
            keep
            if keep is not None
            else roles.grants_of(conn, self.sealer, user.realm, user.user_id)
        )
        self.tokens.cut_off(conn, user.user_id)
        users.reseal(conn, self.sealer, user.user_id)
        roles.reseal_grants(conn, self.sealer, user.realm, user.user_id, valid)

    def close(self) -> None:
        atexit.unregister(self.audit.close)  # the registration kept a closed identity alive
        self.audit.close()
        self.db.close()

    def __repr__(self) -> str:
        return f"<Identity {self.db.engine.dialect.name}>"

    # -- realms -----------------------------------------------------------------------

    def create_realm(self, name: str, *, actor: str = "local") -> Realm:
        with self.db.begin() as conn:
            realm = realms.create(conn, name)
            roles.seal_builtin(conn, self.sealer, name)
            create_signing_key(conn, self._wrapper, name)
            self.audit.record(MASTER, actor, "realm.create", name, conn=conn)
        return realm

    def list_realms(self) -> list[Realm]:
        with self.db.begin() as conn:
            return realms.list_all(conn)

    def realm_exists(self, name: str) -> bool:
        with self.db.begin() as conn:
            return realms.exists(conn, name)

    def require_realm(self, name: str) -> None:
        with self.db.begin() as conn:
            realms.require(conn, name)

    def delete_realm(self, name: str, *, actor: str = "local") -> None:
        with self.db.begin() as conn:
            realms.delete(conn, name)
            self.audit.record(MASTER, actor, "realm.delete", name, conn=conn)
        self.tokens.invalidate()
        self._verified.clear()
        self._role_cache.pop(name, None)

    def ensure_master(self, admin_password: str | None) -> str | None:
        """Create realm ``master`` with user ``admin`` unless they exist.

        :returns: the generated admin password if one was made (to show once), else None.
        """
        generated = None
        with self.db.begin() as conn:
            if not realms.exists(conn, MASTER):
                realms.create(conn, MASTER)
                roles.seal_builtin(conn, self.sealer, MASTER)
                create_signing_key(conn, self._wrapper, MASTER)
                self.audit.record(MASTER, "init", "realm.create", MASTER, conn=conn)
            has_admin = users.find(conn, MASTER, "admin") is not None
        if has_admin:
            return None
        if admin_password is None:
            admin_password = generated = generate_password()
        self.add_user(MASTER, "admin", admin_password, ["admin"], actor="init")
        return generated

    # -- users ------------------------------------------------------------------------

    def add_user(
        self,
        realm: str,
        username: str,
        password: str,
        role_names: Iterable[str] = (),
        *,
        actor: str = "local",
    ) -> User:
        validate_password(password)
        users.validate_username(username)
        hashed = self.hashing.hash(password)
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = users.create(conn, self.sealer, realm, username, hashed, "user")
            for role in dict.fromkeys(role_names):
                roles.grant(conn, self.sealer, realm, user.user_id, role, None)
            self.audit.record(
                realm, actor, "user.create", username, conn=conn, roles=list(role_names)
            )
        return self.get_user(realm, username)

    def list_users(self, realm: str, kind: str | None = None) -> list[User]:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            return users.list_all(conn, self.sealer, realm, kind)

    def get_user(self, realm: str, username: str) -> User:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            stored = users.get(conn, realm, username)
            user = users.intact(self.sealer, stored)
            # A disabled user keeps his grants (shown, and weighed by the no-escalation
            # rule before anyone re-enables him); a row failing its MAC has none.
            authentic = self.sealer.user_ok(stored)
            grants = roles.grants_of(conn, self.sealer, realm, user.user_id) if authentic else []
        return User(**{**user.__dict__, "grants": tuple(grants)})

    def set_password(
        self, realm: str, username: str, password: str, *, actor: str = "local"
    ) -> None:
        validate_password(password)
        hashed = self.hashing.hash(password)
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = self._intact(users.get(conn, realm, username, for_update=True))
            if user.kind != "user":
                raise ValidationError(f"{username!r} is a service account; it has no password")
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_secret_hash(conn, user.user_id, hashed)
            lockout.unlock(conn, user.user_id)
            refresh.revoke_user(conn, user.user_id)
            self._cut_off(conn, user, keep)
            self.audit.record(realm, actor, "user.password", username, conn=conn)

    def set_enabled(
        self, realm: str, username: str, enabled: bool, *, actor: str = "local"
    ) -> None:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = self._intact(users.get(conn, realm, username, for_update=True))
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_enabled(conn, user.user_id, enabled)
            if not enabled:
                refresh.revoke_user(conn, user.user_id)
                self._cut_off(conn, user, keep)
            else:
                users.reseal(conn, self.sealer, user.user_id)
            self.audit.record(
                realm, actor, "user.enable" if enabled else "user.disable", username, conn=conn
            )

    # -- roles ------------------------------------------------------------------------

    def create_role(
        self,
        realm: str,
        name: str,
        permissions: Iterable[str],
        description: str = "",
        *,
        actor: str = "local",
    ) -> Role:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            role = roles.create(conn, self.sealer, realm, name, permissions, description)
            self.audit.record(
                realm, actor, "role.create", name, conn=conn, permissions=list(role.permissions)
            )
        self._role_cache.pop(realm, None)
        return role

    def list_roles(self, realm: str) -> list[Role]:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            return roles.list_all(conn, realm, self.sealer)

    def grant(
        self,
        realm: str,
        username: str,
        role: str,
        scope: str | None = None,
        *,
        actor: str = "local",
    ) -> bool:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = self._intact(users.get(conn, realm, username, for_update=True))
            added = roles.grant(conn, self.sealer, realm, user.user_id, role, scope)
            self.audit.record(
                realm, actor, "role.grant", username, conn=conn, role=role, scope=scope or "*"
            )
            return added

    def revoke_role(
        self,
        realm: str,
        username: str,
        role: str,
        scope: str | None = None,
        *,
        actor: str = "local",
    ) -> bool:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = self._intact(users.get(conn, realm, username, for_update=True))
            held = roles.grants_of(conn, self.sealer, realm, user.user_id)
            removed = roles.revoke(conn, realm, user.user_id, role, scope)
            if not removed:
                raise NotFoundError(
                    f"{username!r} does not hold role {role!r}", code="grant_not_found"
                )
            # Tokens name their roles; the ones naming this grant must stop working. (Refresh
            # tokens stay: a refreshed access token carries only the grants held then.)
            left = roles.grants_of_rows(conn, realm, user.user_id)
            self._cut_off(conn, user, [g for g in held if g in left])
            self.audit.record(
                realm, actor, "role.revoke", username, conn=conn, role=role, scope=scope or "*"
            )
            return removed

    def role_permissions(self, realm: str) -> dict[str, tuple[str, ...]]:
        cached = self._role_cache.get(realm)
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.settings.cache_seconds:
            return cached[1]
        with self.db.begin() as conn:
            perms = roles.permissions_by_role(conn, realm, self.sealer)
        self._role_cache[realm] = (now, perms)
        return perms

    # -- service accounts -------------------------------------------------------------

    def create_client(
        self, realm: str, client_id: str, role_names: Iterable[str] = (), *, actor: str = "local"
    ) -> NewSecret:
        secret = new_client_secret()
        with self.db.begin() as conn:
            realms.require(conn, realm)
            user = users.create(
                conn, self.sealer, realm, client_id, hash_client_secret(secret), "client"
            )
            for role in dict.fromkeys(role_names):
                roles.grant(conn, self.sealer, realm, user.user_id, role, None)
            self.audit.record(
                realm, actor, "client.create", client_id, conn=conn, roles=list(role_names)
            )
        return NewSecret(self.get_user(realm, client_id), secret)

    # -- grants (OAuth2) --------------------------------------------------------------

    def _issue(
        self, realm: str, user: User, grants: list[tuple[str, str]], now: float | None = None
    ) -> AccessToken:
        unscoped = {r for r, s in grants if s == ""}
        scoped: dict[str, list[str]] = {}
        for r, s in grants:
            if s and r not in unscoped:
                scoped.setdefault(r, []).append(s)
        return self.tokens.issue(
            realm,
            user.user_id,
            user.username,
            {r for r, _ in grants},
            scoped=scoped,
            kind=user.kind,
            now=now,
        )

    def password_grant(
        self, realm: str, username: str, password: str, *, source: str | None = None
    ) -> TokenResponse:
        """Log in with a password: access + refresh token, or one uniform 401.

        ``source`` is the client's address: one address (and one account) gets at most a
        fair share of the hashing slots (:class:`PasswordHashing`), else 503 ``login_busy``.

        The outcome is decided atomically with the lock state after the hash is verified
        (:func:`lockout.claim_success`, :func:`lockout.record_failure`): a login that was
        hashing while another failure locked the user fails.
        """
        if not isinstance(username, str) or not isinstance(password, str):
            raise _login_error()
        with self.db.begin() as conn:
            known_realm = realms.exists(conn, realm) if isinstance(realm, str) else False
            user = (
                users.find(conn, realm, username) if known_realm and len(username) <= 128 else None
            )
        if user is not None and user.kind != "user":
            user = None
        ok = self.hashing.verify(
            user.secret_hash if user else None,
            password,
            source=source,
            account=f"{realm}/{username}"[:200] if isinstance(realm, str) else None,
        )
        reason = None
        if user is None:
            reason = "unknown_user"
        elif not self.sealer.user_ok(user):
            reason = "integrity"
        elif lockout.is_locked(user.locked_until):
            reason = "locked"
        elif not ok:
            reason = "bad_password"
        elif not user.enabled:
            reason = "disabled"
        new_hash = None
        if reason is None:
            assert user is not None
            rehash = self.hashing.needs_rehash(user.secret_hash)
            new_hash = self.hashing.hash(password) if rehash and len(password) >= 8 else None
        with self.db.begin() as conn:
            if reason is None:
                assert user is not None
                reason = lockout.claim_success(conn, user.user_id, user.secret_hash)
                now_row = users.by_id(conn, user.user_id) if reason is None else None
                if reason is None and (now_row is None or not self.sealer.user_ok(now_row)):
                    reason = "integrity"  # changed without the root key while hashing
            if reason is not None:
                self._login_failed(conn, realm, known_realm, user, reason, source)
            else:
                assert user is not None
                issued_at = time.time()  # under the row lock claim_success took
                if new_hash is not None:
                    users.set_secret_hash(conn, user.user_id, new_hash)
                    users.reseal(conn, self.sealer, user.user_id)
                grants = roles.grants_of(conn, self.sealer, realm, user.user_id)
                rtoken, rexp = refresh.issue(
                    conn,
                    realm,
                    user.user_id,
                    self.settings.refresh_token_ttl,
                    session_max=self.settings.session_max_seconds,
                )
                self.audit.record(
                    realm,
                    user.username,
                    "login",
                    user.username,
                    conn=conn,
                    grant="password",
                    rehashed=bool(new_hash) or None,
                    source=source,
                )
        if reason is not None:
            raise _login_error()
        assert user is not None
        access = self._issue(realm, user, grants, issued_at)
        return TokenResponse(
            access.token,
            self.settings.access_token_ttl,
            realm,
            user.user_id,
            rtoken,
            int(rexp - issued_at),
        )

    def _login_failed(
        self,
        conn: Connection,
        realm: str,
        known_realm: bool,
        user: User | None,
        reason: str,
        source: str | None,
    ) -> None:
        """Count (a wrong password) and audit a failed password login."""
        if not known_realm:
            return
        locked_now = False
        if reason == "bad_password" and user is not None:
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
            locked=locked_now or None,
            source=source,
        )

    def refresh_grant(self, realm: str, token: str) -> TokenResponse:
        """Trade a refresh token for new tokens; a reused one revokes its family."""
        now = time.time()
        failure: str | None = None
        user: User | None = None
        with self.db.begin() as conn:
            record = refresh.find(conn, token)
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
                grants = roles.grants_of(conn, self.sealer, realm, user.user_id)
                rtoken, rexp = refresh.issue(
                    conn,
                    realm,
                    user.user_id,
                    self.settings.refresh_token_ttl,
                    family_id=record.family_id,
                    family_expires_at=record.family_expires_at,
                )
                self.audit.record(realm, user.username, "token.refresh", user.username, conn=conn)
        if failure is not None:
            raise AuthError(_BAD_REFRESH, code="invalid_grant")
        assert user is not None
        access = self._issue(realm, user, grants)
        return TokenResponse(
            access.token,
            self.settings.access_token_ttl,
            realm,
            user.user_id,
            rtoken,
            int(rexp - now),
        )

    def client_credentials_grant(self, realm: str, client_id: str, secret: str) -> TokenResponse:
        """A service account's access token (no refresh token, as OAuth2 recommends)."""
        with self.db.begin() as conn:
            known_realm = isinstance(realm, str) and realms.exists(conn, realm)
            user = (
                users.find(conn, realm, client_id)
                if known_realm and isinstance(client_id, str) and len(client_id) <= 128
                else None
            )
        if user is not None and user.kind != "client":
            user = None
        ok = verify_client_secret(user.secret_hash if user else None, secret)
        ok = ok and user is not None and self.sealer.user_ok(user)
        if not ok or user is None or not user.enabled:
            if known_realm:
                self.audit.record(
                    realm,
                    user.username if user else "(unknown)",
                    "login",
                    "-",
                    "failure",
                    grant="client_credentials",
                )
            raise AuthError(_BAD_CLIENT, code="invalid_client")
        with self.db.begin() as conn:
            grants = roles.grants_of(conn, self.sealer, realm, user.user_id)
            self.audit.record(
                realm, user.username, "login", user.username, conn=conn, grant="client_credentials"
            )
        access = self._issue(realm, user, grants)
        return TokenResponse(access.token, self.settings.access_token_ttl, realm, user.user_id)

    def mint_token(self, realm: str, username: str, *, actor: str = "local") -> TokenResponse:
        """An access token for ``username`` without a password: for the local operator,
        who holds the root key and the database anyway (``qauth token``)."""
        user = self.get_user(realm, username)
        if not user.enabled:
            raise ValidationError(f"user {username!r} is disabled")
        access = self._issue(realm, user, list(user.grants))
        self.audit.record(realm, actor, "token.issue", username)
        return TokenResponse(access.token, self.settings.access_token_ttl, realm, user.user_id)

    # -- verification, revocation, introspection --------------------------------------

    def invalidate_caches(self) -> None:
        """Forget cached signing keys, roles and verified tokens (re-read on next use)."""
        self.tokens.invalidate()
        self._verified.clear()
        self._role_cache.clear()

    def principal_from_claims(self, claims: dict[str, Any]) -> Principal:
        realm = claims["realm"]
        scoped = claims.get("scoped_roles") or {}
        grants = [(r, "") for r in claims["roles"] if r not in scoped]
        for role, patterns in scoped.items() if isinstance(scoped, dict) else ():
            grants.extend((role, str(p)) for p in patterns if p)
        return Principal(
            subject=str(claims["sub"]),
            username=str(claims.get("preferred_username", claims["sub"])),
            realm=realm,
            roles=tuple(claims["roles"]),
            permissions=permission_map(grants, self.role_permissions(realm)),
            token_id=str(claims["jti"]),
            expires_at=float(claims["exp"]),
            kind=str(claims.get("kind", "user")),
        )

    def authenticate(self, token: str) -> Principal:
        """The principal of a valid bearer access token. :raises AuthError: otherwise.

        A token seen before (the very same string) is not verified again while it is
        unexpired and its principal is younger than ``cache_seconds``; expiry, the
        revocation list and the user's token cut-off are still checked on every call.
        """
        cached = self._verified.get(token) if isinstance(token, str) else None
        if cached is not None:
            principal, born, issued = cached
            if (
                principal.expires_at is not None
                and principal.expires_at > time.time()
                and time.monotonic() - born < self.settings.cache_seconds
            ):
                if (
                    principal.token_id is not None and self.tokens.is_revoked(principal.token_id)
                ) or self.tokens.is_cut_off(principal.subject, issued):
                    raise invalid_token()
                return principal
            self._verified.pop(token, None)
        claims = self.tokens.verify(token)
        principal = self.principal_from_claims(claims)
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified[token] = (principal, time.monotonic(), issued_ms(claims))
        return principal

    def revoke(self, realm: str, token: str, *, actor: str | None = None) -> bool:
        """Revoke an access token (its jti) or a refresh token (its whole family).

        Unknown or invalid tokens are ignored (RFC 7009); returns True if anything changed.
        """
        if not isinstance(token, str):
            return False
        if token.startswith(refresh.PREFIX):
            with self.db.begin() as conn:
                record = refresh.find(conn, token)
                if record is None or record.realm != realm:
                    return False
                refresh.revoke_family(conn, record.family_id)
                self.audit.record(
                    realm, actor or record.user_id, "token.revoke", "refresh", conn=conn
                )
            return True
        try:
            claims = self.tokens.verify(token)
        except AuthError:
            return False
        if claims["realm"] != realm:
            return False
        with self.db.begin() as conn:
            self.tokens.revoke(conn, realm, str(claims["jti"]), float(claims["exp"]))
            self.audit.record(
                realm,
                actor or str(claims.get("preferred_username")),
                "token.revoke",
                "access",
                conn=conn,
                jti=claims["jti"],
            )
        return True

    def introspect(self, realm: str, token: str) -> dict[str, Any]:
        """RFC 7662 introspection: ``{"active": false}`` for anything unusable."""
        inactive = {"active": False}
        if not isinstance(token, str):
            return inactive
        if token.startswith(refresh.PREFIX):
            with self.db.begin() as conn:
                record = refresh.find(conn, token)
                if (
                    record is None
                    or record.realm != realm
                    or record.revoked
                    or record.used
                    or record.expires_at < time.time()
                ):
                    return inactive
                user = users.by_id(conn, record.user_id)
            if user is None or not user.enabled or not self.sealer.user_ok(user):
                return inactive
            return {
                "active": True,
                "token_type": "refresh_token",
                "sub": user.user_id,
                "username": user.username,
                "realm": realm,
                "exp": int(record.expires_at),
            }
        try:
            claims = self.tokens.verify(token)
        except AuthError:
            return inactive
        if claims["realm"] != realm:
            return inactive
        return {
            "active": True,
            "token_type": "access_token",
            "sub": claims["sub"],
            "username": claims.get("preferred_username"),
            "realm": realm,
            "roles": claims["roles"],
            "exp": claims["exp"],
            "iat": claims["iat"],
            "iss": claims["iss"],
            "aud": claims["aud"],
            "jti": claims["jti"],
        }

    def jwks(self, realm: str) -> dict[str, Any]:
        self.require_realm(realm)
        return self.tokens.jwks(realm)

    def rotate_signing_key(self, realm: str, *, actor: str = "local") -> str:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            kid = self.tokens.rotate(conn, realm)
            self.audit.record(realm, actor, "signing_key.rotate", kid, conn=conn)
        self.tokens.invalidate()
        self._verified.clear()
        return kid

    # -- audit ------------------------------------------------------------------------

    def record(
        self,
        realm: str,
        actor: str,
        action: str,
        target: str = "-",
        outcome: str = "success",
        *,
        buffered: bool = False,
        **detail: Any,
    ) -> None:
        """Record an audit event (key operations from the service or HTTP layer)."""
        self.audit.record(realm, actor, action, target, outcome, buffered=buffered, **detail)

    def audit_events(self, realm: str, **filters: Any) -> list[AuditRecord]:
        self.require_realm(realm)
        return self.audit.query(realm, **filters)
