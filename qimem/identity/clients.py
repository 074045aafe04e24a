"""Service accounts' lifecycle: list, show, enable/disable, secret rotation with an overlap,
delete (the :class:`~qimem.identity.core.Identity` facade's part; creation is in
:mod:`~qimem.identity.admin`).

A service account is a ``qimem_users`` row of kind ``client`` whose ``secret_hash`` is the
SHA-256 of its current 256-bit secret. Rotating it makes a new secret (returned once, never
stored in clear, never logged or audited) and keeps the previous one valid for an
*overlap* (``qimem_client_secrets``, migration 0008): a row per previous secret with its
expiry and an HMAC under a root-derived key over the account, the secret's hash, its
expiry and the account's *current* hash, so a database writer can neither add a secret of
his own nor bring back a row a later rotation dropped. An overlap of 0 drops every previous
secret and cuts off the account's tokens at once (the answer to a leaked secret).

Disabling or deleting cuts off the account's access tokens (its ``tokens_valid_after``, the
cut-off every server checks: :meth:`~qimem.identity.tokens.TokenService.cut_off`); enabling
again lets it get new tokens, never the old ones. A deleted account leaves a tombstone (its
row renamed ``!deleted:<id>``, kind ``deleted``, no secret, no grants) for as long as
tokens issued before could live, so other servers still see the cut-off; the tombstones of
earlier deletes are purged then.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.errors import NotFoundError, ValidationError
from qimem.identity import db as tables
from qimem.identity import realms, refresh, roles, users
from qimem.identity.admin import NewSecret
from qimem.identity.authz_mac import encode_field
from qimem.identity.base import AccountCheck, IdentityBase
from qimem.identity.passwords import hash_client_secret, new_client_secret, verify_client_secret
from qimem.identity.tokens import lock_user_row
from qimem.identity.users import User

_LABEL = "client-secret-mac-v1"
#: The default overlap of a rotation: the old secret keeps working this long (seconds).
DEFAULT_OVERLAP = 3600
#: The longest overlap a rotation may give (30 days).
MAX_OVERLAP = 30 * 86400
#: Previous secrets kept at most (rotations in quick succession drop the oldest).
MAX_PREVIOUS = 4
DELETED = "deleted"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_overlap(value: str | int | None) -> int:
    """An overlap in seconds from ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"``, ``"0"`` or an
    integer; None is the default (one hour).

    :raises ValidationError: not a duration of 0 to 30 days.
    """
    if value is None:
        return DEFAULT_OVERLAP
    if isinstance(value, bool):
        raise ValidationError("the overlap must be a duration such as 1h", code="invalid_value")
    if isinstance(value, int):
        seconds = value
    else:
        text = str(value).strip().lower()
        unit = _UNITS.get(text[-1:]) if text[-1:].isalpha() else 1
        digits = text[:-1] if text[-1:].isalpha() else text
        if unit is None or not digits.isdigit() or len(digits) > 9:
            raise ValidationError(
                "the overlap must be a duration such as 0, 90s, 15m, 1h or 2d",
                code="invalid_value",
            )
        seconds = int(digits) * unit
    if not 0 <= seconds <= MAX_OVERLAP:
        raise ValidationError("the overlap must be between 0 and 30 days", code="invalid_value")
    return seconds


class SecretSealer:
    """The MAC of a previous-secret row. Its repr shows no key."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mac(
        self, realm: str, user_id: str, secret_hash: str, expires_at: float, current: str
    ) -> str:
        message = b"qimem client secret v1\x00" + b"".join(
            encode_field(f) for f in (realm, user_id, secret_hash, float(expires_at), current)
        )
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def __repr__(self) -> str:
        return "<SecretSealer hmac-sha256>"


_PREVIOUS = sa.select(  # built once: every client_credentials login reads it
    tables.client_secrets.c.secret_hash,
    tables.client_secrets.c.expires_at,
    tables.client_secrets.c.mac,
).where(
    tables.client_secrets.c.user_id == sa.bindparam("ps_user"),
    tables.client_secrets.c.realm == sa.bindparam("ps_realm"),
    tables.client_secrets.c.expires_at > sa.bindparam("ps_now"),
)


def previous_secrets(
    conn: Connection, sealer: SecretSealer, user: User, now: float
) -> list[tuple[str, float]]:
    """The authentic, unexpired previous secrets of ``user`` (hash, expiry), newest first."""
    rows = conn.execute(
        _PREVIOUS, {"ps_user": user.user_id, "ps_realm": user.realm, "ps_now": now}
    ).all()
    found = []
    for r in rows:
        expected = sealer.mac(
            user.realm, user.user_id, r.secret_hash, r.expires_at, user.secret_hash
        )
        if isinstance(r.mac, str) and hmac.compare_digest(r.mac, expected):
            found.append((r.secret_hash, float(r.expires_at)))
    return sorted(found, key=lambda p: -p[1])


def secret_matches(
    conn: Connection, sealer: SecretSealer, user: User, secret: str, now: float
) -> str | None:
    """``"current"`` or ``"previous"`` if ``secret`` is one of ``user``'s valid secrets,
    else None. Every candidate is compared (constant time each), so the answer's time does
    not tell which one matched."""
    current = verify_client_secret(user.secret_hash, secret)
    previous = False
    for stored, _ in previous_secrets(conn, sealer, user, now):
        previous = verify_client_secret(stored, secret) or previous
    return "current" if current else ("previous" if previous else None)


def secret_sealer(ident: IdentityBase) -> SecretSealer:
    """The previous-secret sealer of ``ident`` (made once, under its root key)."""
    found: SecretSealer | None = getattr(ident, "_secret_sealer", None)
    if found is None:
        found = SecretSealer(ident._wrapper.derive_key(_LABEL))
        ident._secret_sealer = found  # type: ignore[attr-defined]
    return found


def _not_found(realm: str, client_id: str) -> NotFoundError:
    return NotFoundError(
        f"no service account {client_id!r} in realm {realm!r}", code="client_not_found"
    )


class ClientAdministration(IdentityBase):
    """The service-account lifecycle (see the module's docstring)."""

    def _client(self, conn: Connection, realm: str, client_id: str) -> User:
        realms.require(conn, realm)
        found = users.find(conn, realm, client_id) if isinstance(client_id, str) else None
        if found is None or found.kind != "client":
            raise _not_found(realm, client_id)
        return found

    def get_client(self, realm: str, client_id: str) -> tuple[User, list[float]]:
        """The service account (with its grants) and the expiries of its previous secrets.

        :raises NotFoundError: no such realm, or no service account of that name.
        """
        with self.db.begin() as conn:
            self._client(conn, realm, client_id)
            user = self._load_user(conn, realm, client_id)
            previous = previous_secrets(conn, secret_sealer(self), user, time.time())
        return user, [at for _, at in previous]

    def require_client(self, realm: str, client_id: str) -> None:
        """:raises NotFoundError: no such realm or service account (a user is not one)."""
        with self.db.begin() as conn:
            self._client(conn, realm, client_id)

    def set_client_enabled(
        self,
        realm: str,
        client_id: str,
        enabled: bool,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> None:
        """Disable (its tokens are cut off at once) or enable (new tokens only)."""
        with self.db.begin() as conn:
            user = self._locked(conn, realm, client_id, check)
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_enabled(conn, user.user_id, enabled)
            if not enabled:
                refresh.revoke_user(conn, user.user_id)
                self._cut_off(conn, user, keep)
            else:
                users.reseal(conn, self.sealer, user.user_id)
            action = "client.enable" if enabled else "client.disable"
            self.audit.record(realm, actor, action, client_id, conn=conn)

    def _locked(
        self, conn: Connection, realm: str, client_id: str, check: AccountCheck | None
    ) -> User:
        """The service account, its row write-locked first (on SQLite too: the lock is the
        first statement of the transaction), re-read, verified and passed by ``check``."""
        found = self._client(conn, realm, client_id)
        lock_user_row(conn, found.user_id)
        user = self._intact(users.get(conn, realm, client_id, for_update=True))
        if user.kind != "client" or user.user_id != found.user_id:
            raise _not_found(realm, client_id)
        if check is not None:
            check(conn, user)
        return user

    def rotate_client_secret(
        self,
        realm: str,
        client_id: str,
        overlap: int = DEFAULT_OVERLAP,
        *,
        actor: str = "local",
        check: AccountCheck | None = None,
    ) -> NewSecret:
        """A new secret for the service account (returned once); the old one stays valid
        ``overlap`` seconds (0: at once invalid, and the account's tokens are cut off).

        Rotations of one account serialize on its row lock; each keeps the secrets the one
        before it left valid, so two at once leave both new secrets and the old one working
        for the overlap, never an account no secret opens."""
        overlap = parse_overlap(overlap)
        secret = new_client_secret()
        new_hash = hash_client_secret(secret)
        sealer = secret_sealer(self)
        c = tables.client_secrets.c
        with self.db.begin() as conn:
            user = self._locked(conn, realm, client_id, check)
            now = time.time()
            kept = previous_secrets(conn, sealer, user, now) if overlap else []
            conn.execute(sa.delete(tables.client_secrets).where(c.user_id == user.user_id))
            if overlap:
                kept = [(user.secret_hash, now + overlap), *kept][:MAX_PREVIOUS]
                conn.execute(
                    sa.insert(tables.client_secrets),
                    [
                        {
                            "secret_id": str(uuid.uuid4()),
                            "user_id": user.user_id,
                            "realm": realm,
                            "secret_hash": stored,
                            "expires_at": at,
                            "mac": sealer.mac(realm, user.user_id, stored, at, new_hash),
                        }
                        for stored, at in kept
                    ],
                )
            keep = roles.grants_of(conn, self.sealer, realm, user.user_id)
            users.set_secret_hash(conn, user.user_id, new_hash)
            if overlap:
                users.reseal(conn, self.sealer, user.user_id)
            else:
                self._cut_off(conn, user, keep)
            self.audit.record(
                realm, actor, "client.rotate_secret", client_id, conn=conn, overlap=overlap
            )
        return NewSecret(self.get_client(realm, client_id)[0], secret)

    def delete_client(
        self, realm: str, client_id: str, *, actor: str = "local", check: AccountCheck | None = None
    ) -> None:
        """Delete the service account: its secrets and grants go, its tokens are cut off,
        its name is free again (its row stays as a tombstone while its tokens could live)."""
        c = tables.users.c
        with self.db.begin() as conn:
            user = self._locked(conn, realm, client_id, check)
            now = time.time()
            horizon = now - max(self.settings.access_token_ttl, 3600) - 60
            conn.execute(
                sa.delete(tables.users).where(
                    c.realm == realm, c.kind == DELETED, c.tokens_valid_after < horizon
                )
            )
            for table in (tables.client_secrets, tables.grants, tables.refresh_tokens):
                conn.execute(sa.delete(table).where(table.c.user_id == user.user_id))
            conn.execute(
                sa.update(tables.users)
                .where(c.user_id == user.user_id)
                .values(
                    username=f"!{DELETED}:{user.user_id}",
                    kind=DELETED,
                    enabled=False,
                    secret_hash=f"!{DELETED}",
                )
            )
            self.tokens.cut_off(conn, user.user_id)
            users.reseal(conn, self.sealer, user.user_id)
            self.audit.record(realm, actor, "client.delete", client_id, conn=conn)


def client_dict(user: User, previous: list[float] | None = None) -> dict[str, Any]:
    """A service account's JSON shape (``qauth client show``, ``GET .../clients/{id}``)."""
    from datetime import UTC, datetime

    body = {**user.to_dict(), "client_id": user.username}
    if previous is not None:
        body["previous_secrets_expire"] = [
            datetime.fromtimestamp(at, UTC).isoformat() for at in previous
        ]
    return body


__all__ = [
    "DEFAULT_OVERLAP",
    "ClientAdministration",
    "client_dict",
    "parse_overlap",
    "secret_matches",
    "secret_sealer",
]
