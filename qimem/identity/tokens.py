"""Access tokens: EdDSA (Ed25519) JWTs made and checked with PyJWT, per-realm signing keys.

Each realm has one active signing key; rotation makes a new one and keeps the old public
key in the JWKS (and accepted by verification) until every token it signed has expired.
Private keys are stored wrapped under the root key with a context of their own, so they
can never be confused with (or unwrapped as) data-key material.

Verification accepts ``alg: EdDSA`` only, and only with a ``kid`` of a known, unexpired key
of the realm the token claims; ``none``, HMAC with the public key as secret, another
realm's key, tampering, expiry, a wrong issuer or audience, a revoked ``jti``, and a token
of a user whose tokens were cut off (disabled, new password, role revoked: see
:meth:`TokenService.cut_off`) all fail with the same 401.

Revocations reach other servers through the database: every server re-reads the revoked
``jti`` list and the users' token cut-offs at most every ``revocation_refresh_seconds``
(2 s by default), so a revocation made on one server is enforced by all within that bound
(on the server that made it, at once). On PostgreSQL the revoking transaction also sends a
change notice (:mod:`qimem.invalidation`): servers whose change feed is connected re-read
that one row as soon as it commits (:meth:`TokenService.reload_revocation`,
:meth:`TokenService.reload_cutoff`), and the polling bound stays as the fallback.
"""

from __future__ import annotations

import base64
import hmac
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jwt
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy.engine import Connection

from qimem.errors import AuthError, QimemError
from qimem.identity import db as tables
from qimem.identity.authz_mac import Reporter
from qimem.identity.db import Database
from qimem.identity.settings import IdentitySettings
from qimem.invalidation import TOKEN, USER, Change, notify
from qimem.rootkey import KeyWrapper

ALGORITHM = "EdDSA"
_REQUIRED = ["iss", "sub", "aud", "exp", "iat", "jti"]
_PURGE_INTERVAL = 600.0
_DERIVED_MAX = 10_000


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _wrap_context(realm: str, kid: str) -> bytes:
    return f"qimem-jwt-signing-key-v1|{realm}|{kid}".encode()


def issued_ms(claims: dict[str, Any]) -> int:
    """When a token was issued, in milliseconds (``iat_ms``; ``iat`` for older tokens)."""
    precise = claims.get("iat_ms")
    if isinstance(precise, int) and not isinstance(precise, bool):
        return precise
    return int(claims["iat"]) * 1000


def invalid_token() -> AuthError:
    """The one error every unusable access token gets."""
    return AuthError("invalid or expired access token", code="invalid_token")


@dataclass(frozen=True)
class PublicKey:
    kid: str
    realm: str
    key: Ed25519PublicKey = field(repr=False)
    raw: str
    active: bool
    retire_at: float | None

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.raw,
            "kid": self.kid,
            "use": "sig",
            "alg": ALGORITHM,
        }


def _public_keys() -> sa.Select[Any]:
    """The columns of ``qimem_signing_keys`` that make a :class:`PublicKey`."""
    c = tables.signing_keys.c
    return sa.select(c.kid, c.realm, c.public_key, c.private_wrapped, c.active, c.retire_at)


# The no-op UPDATE that write-locks a user's row (built once), and the same statement
# returning the row as it is under that lock.
_LOCK_ROW = (
    sa.update(tables.users)
    .where(tables.users.c.user_id == sa.bindparam("lr_user"))
    .values(tokens_valid_after=tables.users.c.tokens_valid_after)
)
_LOCK_AND_READ = _LOCK_ROW.returning(*tables.users.c)


def lock_user_row(conn: Connection, user_id: str) -> None:
    """Write-lock ``user_id``'s row until the transaction ends (a no-op ``UPDATE``: a row
    lock on PostgreSQL, the database's write lock on SQLite). Times taken after it are later
    than any token cut-off committed before, and earlier than any committed after."""
    conn.execute(_LOCK_ROW, {"lr_user": user_id})


# A revocation's statements, built once.
_REVOKED = sa.select(tables.revoked_tokens.c.jti).where(
    tables.revoked_tokens.c.jti == sa.bindparam("rv_jti")
)
_INSERT_REVOKED = sa.insert(tables.revoked_tokens)


def lock_and_read_user_row(conn: Connection, user_id: str) -> Any:
    """:func:`lock_user_row` and a re-read of the row under that lock, in one statement
    (``UPDATE ... RETURNING`` every column); None if there is no such row."""
    return conn.execute(_LOCK_AND_READ, {"lr_user": user_id}).first()


@dataclass(frozen=True)
class AccessToken:
    """A signed access token; the repr shows only its id and expiry."""

    token: str = field(repr=False)
    jti: str
    expires_at: float
    claims: dict[str, Any] = field(repr=False)


def create_signing_key(conn: Connection, wrapper: KeyWrapper, realm: str) -> str:
    """A new active Ed25519 signing key for ``realm``; returns its kid."""
    private = Ed25519PrivateKey.generate()
    raw_private = bytearray(
        private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    kid = str(uuid.uuid4())
    try:
        wrapped = wrapper.wrap(raw_private, _wrap_context(realm, kid))
    finally:
        raw_private[:] = bytes(len(raw_private))
    conn.execute(
        sa.insert(tables.signing_keys).values(
            kid=kid,
            realm=realm,
            public_key=_b64url(public),
            private_wrapped=wrapped,
            active=True,
            created_at=time.time(),
            retire_at=None,
        )
    )
    return kid


class TokenService:
    """Signs and verifies access tokens; caches keys and the revocation list."""

    def __init__(
        self,
        database: Database,
        wrapper: KeyWrapper,
        settings: IdentitySettings,
        report: Reporter | None = None,
    ) -> None:
        self._db = database
        self._wrapper = wrapper
        self._settings = settings
        self._report = report
        self._lock = threading.Lock()
        # (kid, realm, wrapped private key) -> the public key it unwraps to (raw, b64url)
        self._derived: dict[tuple[str, str, bytes], str] = {}
        self._public: dict[str, PublicKey] = {}
        self._public_loaded = 0.0
        self._private: dict[str, tuple[str, Ed25519PrivateKey, float]] = {}
        self._revoked: dict[str, float] = {}
        self._cutoffs: dict[str, float] = {}  # user id -> tokens_valid_after (recent ones)
        self._revoked_loaded = 0.0
        self._revoked_purged = time.monotonic()
        # Named by another server's change notice, until the row is re-read (refused
        # meanwhile: a notice can only delay a token, never admit one): jti -> when, and
        # user id -> when (his tokens issued until then).
        self._suspect_jtis: dict[str, float] = {}
        self._suspect_users: dict[str, float] = {}

    # -- keys -------------------------------------------------------------------------

    def _load_public(self, force: bool = False) -> dict[str, PublicKey]:
        now = time.monotonic()
        if not force and now - self._public_loaded < self._settings.cache_seconds:
            return self._public
        with self._db.begin() as conn:
            rows = conn.execute(_public_keys()).all()
        keys = {r.kid: key for r in rows if (key := self._authentic(r)) is not None}
        with self._lock:
            self._public = keys
            self._public_loaded = now
        return keys

    def _derive_public(self, realm: str, kid: str, wrapped: bytes) -> str | None:
        """The public key of the private key ``wrapped`` (unwrapped with the context that
        binds it to ``realm`` and ``kid``), or None if it does not unwrap. Cached: the
        unwrap runs once per key, not per load."""
        ident = (kid, realm, bytes(wrapped))
        derived = self._derived.get(ident)
        if derived is not None:
            return derived
        try:
            raw = self._wrapper.unwrap(bytes(wrapped), _wrap_context(realm, kid))
        except QimemError:
            return None
        try:
            private = Ed25519PrivateKey.from_private_bytes(bytes(raw))
        except ValueError:
            return None
        finally:
            raw[:] = bytes(len(raw))
        derived = _b64url(
            private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )
        with self._lock:
            if len(self._derived) >= _DERIVED_MAX:
                self._derived.clear()
            self._derived[ident] = derived
        return derived

    def _authentic(self, row: Any) -> PublicKey | None:
        """The key of a ``qimem_signing_keys`` row, if it is one this root key made.

        The stored public key is never trusted on its own (a database writer could insert
        his own): it must be the one derived from the row's private key, which unwraps only
        under the root key and only for this realm and kid. Other rows are ignored and
        reported (finding 15)."""
        derived = self._derive_public(row.realm, row.kid, row.private_wrapped)
        stored = str(row.public_key).encode("utf-8")
        if derived is None or not hmac.compare_digest(derived.encode(), stored):
            if self._report is not None:
                why = "does not unwrap" if derived is None else "is not its private key's"
                self._report(
                    "signing_keys",
                    str(row.realm),
                    f"signing key {row.kid}: the private key {why} mac={str(row.public_key)[:16]}",
                )
            return None
        return PublicKey(
            row.kid,
            row.realm,
            Ed25519PublicKey.from_public_bytes(_unb64url(derived)),
            derived,
            bool(row.active),
            row.retire_at,
        )

    def invalidate(self) -> None:
        """Forget cached keys (after a rotation or realm deletion)."""
        with self._lock:
            self._public_loaded = 0.0
            self._private.clear()

    def _signing_key(self, realm: str) -> tuple[str, Ed25519PrivateKey]:
        """The realm's newest active key that unwraps under the root key (made if there is
        none). An active row that does not unwrap (inserted without the root key) is
        reported and passed over."""
        cached = self._private.get(realm)
        if cached is not None and time.monotonic() - cached[2] < self._settings.cache_seconds:
            return cached[0], cached[1]
        c = tables.signing_keys.c
        with self._db.begin() as conn:
            rows = conn.execute(
                _public_keys()
                .where(c.realm == realm, c.active.is_(True))
                .order_by(c.created_at.desc())
            ).all()
            found = next((k for r in rows if (k := self._unwrap_private(r)) is not None), None)
            if found is None:
                kid = create_signing_key(conn, self._wrapper, realm)
                row = conn.execute(_public_keys().where(c.kid == kid)).one()
                found = self._unwrap_private(row)
        assert found is not None  # a key just made with this root key unwraps
        with self._lock:
            self._private[realm] = (found[0], found[1], time.monotonic())
        return found

    def _unwrap_private(self, row: Any) -> tuple[str, Ed25519PrivateKey] | None:
        """The private key of an authentic signing key row (see :meth:`_authentic`)."""
        if self._authentic(row) is None:
            return None
        raw = self._wrapper.unwrap(bytes(row.private_wrapped), _wrap_context(row.realm, row.kid))
        try:
            return row.kid, Ed25519PrivateKey.from_private_bytes(bytes(raw))
        finally:
            raw[:] = bytes(len(raw))

    def rotate(self, conn: Connection, realm: str) -> str:
        """Make a new active key; old ones stay published until their tokens expire."""
        retire_at = time.time() + self._settings.access_token_ttl + 60
        conn.execute(
            sa.update(tables.signing_keys)
            .where(
                tables.signing_keys.c.realm == realm,
                tables.signing_keys.c.active.is_(True),
            )
            .values(active=False, retire_at=retire_at)
        )
        kid = create_signing_key(conn, self._wrapper, realm)
        conn.execute(
            sa.delete(tables.signing_keys).where(
                tables.signing_keys.c.realm == realm,
                tables.signing_keys.c.retire_at.is_not(None),
                tables.signing_keys.c.retire_at < time.time(),
            )
        )
        return kid

    def jwks(self, realm: str) -> dict[str, list[dict[str, str]]]:
        """The realm's published public keys (active first), as a JWK Set."""
        now = time.time()
        keys = [
            k
            for k in self._load_public(force=True).values()
            if k.realm == realm and (k.retire_at is None or k.retire_at > now)
        ]
        keys.sort(key=lambda k: not k.active)
        return {"keys": [k.jwk() for k in keys]}

    # -- issuing ----------------------------------------------------------------------

    def issue(
        self,
        realm: str,
        subject: str,
        username: str,
        roles: Iterable[str],
        *,
        scoped: dict[str, list[str]] | None = None,
        kind: str = "user",
        ttl: int | None = None,
        now: float | None = None,
    ) -> AccessToken:
        """Sign an access token for ``subject`` in ``realm``."""
        kid, private = self._signing_key(realm)
        precise = now if now is not None else time.time()
        issued = int(precise)
        expires = issued + (ttl if ttl is not None else self._settings.access_token_ttl)
        jti = str(uuid.uuid4())
        claims: dict[str, Any] = {
            "iss": self._settings.issuer(realm),
            "sub": subject,
            "aud": self._settings.audience,
            "exp": expires,
            "iat": issued,
            "iat_ms": int(precise * 1000),
            "nbf": issued,
            "jti": jti,
            "realm": realm,
            "roles": sorted(set(roles)),
            "preferred_username": username,
            "typ": "Bearer",
            "kind": kind,
        }
        if scoped:
            claims["scoped_roles"] = {r: sorted(p) for r, p in sorted(scoped.items())}
        token = jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": kid})
        return AccessToken(token, jti, float(expires), claims)

    # -- verifying --------------------------------------------------------------------

    def verify(self, token: str, *, leeway: float = 0.0) -> dict[str, Any]:
        """The claims of a valid, unrevoked access token.

        :raises AuthError: ``invalid_token`` for anything else (never saying which check).
        """
        if not isinstance(token, str) or not 16 <= len(token) <= 8192:
            raise invalid_token()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise invalid_token() from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise invalid_token()
        key = self._load_public().get(kid)
        if key is None:
            key = self._lookup(kid)
        if key is None or (key.retire_at is not None and key.retire_at < time.time()):
            raise invalid_token()
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[ALGORITHM],
                audience=self._settings.audience,
                issuer=self._settings.issuer(key.realm),
                leeway=leeway,
                options={"require": _REQUIRED, "verify_signature": True},
            )
        except jwt.PyJWTError:
            raise invalid_token() from None
        if claims.get("realm") != key.realm or not isinstance(claims.get("roles"), list):
            raise invalid_token()
        if self.is_revoked(str(claims["jti"])) or self.is_cut_off(
            str(claims["sub"]), issued_ms(claims)
        ):
            raise invalid_token()
        return claims

    def _lookup(self, kid: str) -> PublicKey | None:
        """One key by kid (a key made by another process since the cache was loaded)."""
        if len(kid) > 64:
            return None
        with self._db.begin() as conn:
            row = conn.execute(_public_keys().where(tables.signing_keys.c.kid == kid)).first()
        key = self._authentic(row) if row is not None else None
        if key is None:
            return None
        with self._lock:
            self._public = {**self._public, kid: key}
        return key

    # -- revocation -------------------------------------------------------------------

    def revoke(self, conn: Connection, realm: str, jti: str, expires_at: float) -> None:
        now = time.time()
        exists = conn.execute(_REVOKED, {"rv_jti": jti}).first()
        if exists is None:
            conn.execute(
                _INSERT_REVOKED,
                {"jti": jti, "realm": realm, "expires_at": expires_at, "revoked_at": now},
            )
        notify(conn, Change(TOKEN, realm, jti))
        with self._lock:
            self._revoked[jti] = expires_at

    def is_revoked(self, jti: str) -> bool:
        now = time.monotonic()
        if now - self._revoked_loaded >= self._settings.revocation_refresh_seconds:
            self._refresh_revoked(now)
        return jti in self._revoked or (bool(self._suspect_jtis) and jti in self._suspect_jtis)

    def cut_off(self, conn: Connection, user_id: str) -> float:
        """Refuse every access token of ``user_id`` issued until now (disable, password
        change, role revoke). Returns the cut-off time.

        The user's row is write-locked first and the time taken after: a login of this user
        committing concurrently either finishes before (its token is older than the cut-off)
        or sees this change (see ``lockout.claim``)."""
        c = tables.users.c
        lock_user_row(conn, user_id)
        at = time.time()
        conn.execute(
            sa.update(tables.users).where(c.user_id == user_id).values(tokens_valid_after=at)
        )
        notify(conn, Change(USER, "", user_id))
        with self._lock:
            self._cutoffs[user_id] = max(at, self._cutoffs.get(user_id, 0.0))
        return at

    def is_cut_off(self, user_id: str, issued_at_ms: int) -> bool:
        """True if tokens of ``user_id`` issued at ``issued_at_ms`` were cut off."""
        now = time.monotonic()
        if now - self._revoked_loaded >= self._settings.revocation_refresh_seconds:
            self._refresh_revoked(now)
        cutoff = self._cutoffs.get(user_id)
        if self._suspect_users:
            suspect = self._suspect_users.get(user_id)
            if suspect is not None and (cutoff is None or suspect > cutoff):
                cutoff = suspect
        return cutoff is not None and issued_at_ms <= int(cutoff * 1000)

    def reload_revocation(self, jti: str) -> None:
        """Another server revoked ``jti`` (a change notice): refuse it at once, and re-read
        its row, which decides (no row: the notice was wrong, and it is accepted again). If
        the row cannot be read, it stays refused until the next full refresh."""
        with self._lock:
            self._suspect_jtis[jti] = time.time()
        c = tables.revoked_tokens.c
        try:
            with self._db.read() as conn:
                row = conn.execute(sa.select(c.jti, c.expires_at).where(c.jti == jti)).first()
        except Exception:
            self._revoked_loaded = float("-inf")
            raise
        with self._lock:
            if row is not None:
                self._revoked[row.jti] = float(row.expires_at)
            self._suspect_jtis.pop(jti, None)

    def reload_cutoff(self, user_id: str) -> None:
        """Another server cut off ``user_id``'s tokens (disable, new password, role revoked:
        a change notice): refuse those issued until now at once, and re-read his cut-off,
        which decides (as :meth:`reload_revocation`)."""
        with self._lock:
            self._suspect_users[user_id] = time.time()
        c = tables.users.c
        try:
            with self._db.read() as conn:
                at = conn.execute(
                    sa.select(c.tokens_valid_after).where(c.user_id == user_id)
                ).scalar()
        except Exception:
            self._revoked_loaded = float("-inf")
            raise
        with self._lock:
            if at:
                self._cutoffs[user_id] = max(float(at), self._cutoffs.get(user_id, 0.0))
            self._suspect_users.pop(user_id, None)

    def revalidate_all(self) -> None:
        """Re-read the revocation list, the cut-offs and the signing keys at next use
        (changes may have been missed: a change feed reconnected)."""
        with self._lock:
            self._revoked_loaded = float("-inf")
        self.invalidate()

    def _refresh_revoked(self, now: float) -> None:
        wall = time.time()
        with self._db.begin() as conn:
            rows = conn.execute(
                sa.select(tables.revoked_tokens.c.jti, tables.revoked_tokens.c.expires_at).where(
                    tables.revoked_tokens.c.expires_at > wall
                )
            ).all()
            # Cut-offs older than any live token's lifetime no longer matter.
            horizon = wall - max(self._settings.access_token_ttl, 3600) - 60
            cut = conn.execute(
                sa.select(tables.users.c.user_id, tables.users.c.tokens_valid_after).where(
                    tables.users.c.tokens_valid_after > horizon
                )
            ).all()
            if now - self._revoked_purged > _PURGE_INTERVAL:
                # Rows of long-expired tokens are dropped now and then (a rare write).
                self._revoked_purged = now
                conn.execute(
                    sa.delete(tables.revoked_tokens).where(
                        tables.revoked_tokens.c.expires_at < wall - 3600
                    )
                )
        with self._lock:
            # Merged, never replaced: a revocation or cut-off this server has seen stays in
            # force even if its row is deleted or lowered later (by a database writer).
            revoked = {j: e for j, e in self._revoked.items() if e > wall}
            revoked.update((r.jti, r.expires_at) for r in rows)
            cutoffs = {u: at for u, at in self._cutoffs.items() if at > horizon}
            for r in cut:
                cutoffs[r.user_id] = max(float(r.tokens_valid_after), cutoffs.get(r.user_id, 0.0))
            self._revoked = revoked
            self._cutoffs = cutoffs
            self._revoked_loaded = now
            # What notices named before this read is decided by it (they committed first).
            self._suspect_jtis = {j: t for j, t in self._suspect_jtis.items() if t > wall}
            self._suspect_users = {u: t for u, t in self._suspect_users.items() if t > wall}

    def __repr__(self) -> str:
        return "<TokenService EdDSA>"
