"""Using tokens: authenticate a bearer token, revoke (RFC 7009) and introspect (RFC 7662)
tokens, publish the JWKS and rotate a realm's signing key."""

from __future__ import annotations

import time
from typing import Any

from qimem.errors import AuthError
from qimem.identity import realms, refresh, users
from qimem.identity.base import IdentityBase
from qimem.identity.permissions import Principal, permission_map
from qimem.identity.tokens import invalid_token, issued_ms
from qimem.invalidation import REALM, TOKEN, USER

_VERIFIED_MAX = 10_000


class Verification(IdentityBase):
    """Bearer tokens and the keys that sign them."""

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

    def _access_claims(self, realm: str, token: str) -> dict[str, Any] | None:
        """The claims of a valid access token of ``realm``, else None."""
        try:
            claims = self.tokens.verify(token)
        except AuthError:
            return None
        return claims if claims["realm"] == realm else None

    def revoke(self, realm: str, token: str, *, actor: str | None = None) -> bool:
        """Revoke an access token (its jti) or a refresh token (its whole family).

        Unknown or invalid tokens are ignored (RFC 7009); returns True if anything changed.
        """
        if not isinstance(token, str):
            return False
        if token.startswith(refresh.PREFIX):
            with self.db.begin() as conn:
                record = refresh.find(conn, self.refresh_hasher, token)
                if record is None or record.realm != realm:
                    return False
                refresh.revoke_family(conn, record.family_id)
                self.audit.record(
                    realm, actor or record.user_id, "token.revoke", "refresh", conn=conn
                )
            return True
        claims = self._access_claims(realm, token)
        if claims is None:
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
                record = refresh.find(conn, self.refresh_hasher, token)
                if (
                    record is None
                    or record.realm != realm
                    or record.revoked
                    or record.used
                    or record.expires_at < time.time()
                ):
                    return inactive
                user = users.by_id(conn, record.user_id)
            if (
                user is None
                or not user.enabled
                or not self.sealer.user_ok(user)
                or record.cut_off(user.tokens_valid_after)
            ):
                return inactive
            return {
                "active": True,
                "token_type": "refresh_token",
                "sub": user.user_id,
                "username": user.username,
                "realm": realm,
                "exp": int(record.expires_at),
            }
        claims = self._access_claims(realm, token)
        if claims is None:
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
        with self.db.begin() as conn:
            realms.require(conn, realm)
        return self.tokens.jwks(realm)

    def rotate_signing_key(self, realm: str, *, actor: str = "local") -> str:
        with self.db.begin() as conn:
            realms.require(conn, realm)
            kid = self.tokens.rotate(conn, realm)
            self.audit.record(realm, actor, "signing_key.rotate", kid, conn=conn)
        self.tokens.invalidate()
        self._verified.clear()
        return kid

    # -- changes made by other servers (qimem.invalidation) ---------------------------

    def apply_change(self, kind: str, realm: str, ident: str) -> None:
        """Act on another server's change notice at once: a revoked token (``token``,
        ``ident`` its jti) or a user's tokens (``user``) are refused until their row is
        re-read, which decides; a deleted realm's signing keys, verified tokens and roles
        are forgotten (``realm``). A notice is only a hint: it can delay a token by one
        query, never admit one."""
        if kind == TOKEN:
            self.tokens.reload_revocation(ident)
        elif kind == USER:
            self.tokens.reload_cutoff(ident)
        elif kind == REALM:
            self.tokens.invalidate()  # its signing keys are gone: re-read them
            for token, (principal, _born, _issued) in list(self._verified.items()):
                if principal.realm == realm:
                    self._verified.pop(token, None)
            self._role_cache.pop(realm, None)

    def revalidate_all(self) -> None:
        """Re-read everything another server may have changed, at next use (a change feed
        (re)connected, or sent a notice that does not parse)."""
        self.tokens.revalidate_all()
        self._verified.clear()
        self._role_cache.clear()
