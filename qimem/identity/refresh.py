"""Refresh tokens: opaque random strings, stored only as a keyed hash, rotated on every use.

All refresh tokens descending from one login form a *family*. Using a token marks it used
and issues its successor; presenting a used token again (a stolen copy racing the real
client) revokes the whole family, so both parties must log in again.

A token is ``qrt_<family id>.<random>``. Its row stores, in ``token_hash``, an HMAC-SHA-256
under a key derived from the root key over the row's realm, user id, family, issue time,
expiries and the token itself (finding 15, RT-2): a database writer without the root key can
neither make a row a token of his choice matches nor move a row to another user, realm or
family, nor extend it. A token issued at or before its user's ``tokens_valid_after`` (the
MAC'd cut-off of finding 8: password change, disable, role revoke) is refused whatever its
``revoked`` column says. ``used`` and ``revoked`` are not authenticated (see docs/identity.md).

Tokens issued before this scheme (plain SHA-256 rows) are no longer accepted: their users log
in again.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables
from qimem.identity.authz_mac import encode_field
from qimem.rootkey import KeyWrapper

PREFIX = "qrt_"
_LABEL = "refresh-token-mac-v1"
_TOKEN = re.compile(r"qrt_([0-9a-f]{32})\.([A-Za-z0-9_-]{43})")
_FAMILY_MAX = 5000  # rows of one family looked at (one per refresh; a session has far fewer)


class TokenHasher:
    """The keyed hash refresh token rows are stored under. Its repr shows no key."""

    __slots__ = ("_key",)

    def __init__(self, wrapper: KeyWrapper) -> None:
        self._key = wrapper.derive_key(_LABEL)

    def digest(
        self,
        token: str,
        realm: str,
        user_id: str,
        family_id: str,
        issued_at: float,
        expires_at: float,
        family_expires_at: float,
    ) -> str:
        fields = (realm, user_id, family_id, float(issued_at), float(expires_at))
        message = b"qimem refresh v1\x00" + b"".join(
            encode_field(f) for f in (*fields, float(family_expires_at), token)
        )
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def matches(self, token: str, row: Any) -> bool:
        expected = self.digest(
            token,
            row.realm,
            row.user_id,
            row.family_id,
            row.issued_at,
            row.expires_at,
            row.family_expires_at,
        )
        return hmac.compare_digest(expected.encode(), str(row.token_hash).encode("utf-8"))

    def __repr__(self) -> str:
        return "<TokenHasher hmac-sha256>"


@dataclass(frozen=True)
class RefreshRecord:
    token_hash: str
    family_id: str
    realm: str
    user_id: str
    issued_at: float
    expires_at: float
    family_expires_at: float
    used: bool
    revoked: bool

    def cut_off(self, tokens_valid_after: float) -> bool:
        """True if the token was issued at or before its user's token cut-off."""
        return self.issued_at <= float(tokens_valid_after)


_INSERT = sa.insert(tables.refresh_tokens)  # built once: every login and refresh sends it


def issue(
    conn: Connection,
    hasher: TokenHasher,
    realm: str,
    user_id: str,
    ttl: int,
    *,
    now: float | None = None,
    family_id: str | None = None,
    family_expires_at: float | None = None,
    session_max: int = 36000,
) -> tuple[str, float]:
    """A new refresh token (returned once, in the clear) and its expiry. ``now`` is its
    issue time (taken under the user's row lock by the grants)."""
    now = time.time() if now is None else now
    family = family_id or str(uuid.uuid4())
    token = f"{PREFIX}{uuid.UUID(family).hex}.{secrets.token_urlsafe(32)}"
    family_end = family_expires_at if family_expires_at is not None else now + session_max
    expires = min(now + ttl, family_end)
    conn.execute(
        _INSERT,
        {
            "token_hash": hasher.digest(token, realm, user_id, family, now, expires, family_end),
            "family_id": family,
            "realm": realm,
            "user_id": user_id,
            "issued_at": now,
            "expires_at": expires,
            "family_expires_at": family_end,
            "used": False,
            "revoked": False,
        },
    )
    return token, expires


def find(conn: Connection, hasher: TokenHasher, token: str) -> RefreshRecord | None:
    """The row ``token`` was issued as, if it is authentic (else None: unknown, an old
    SHA-256 row, or a row written or changed without the root key)."""
    match = _TOKEN.fullmatch(token) if isinstance(token, str) else None
    if match is None:
        return None
    rows = conn.execute(
        sa.select(tables.refresh_tokens)
        .where(tables.refresh_tokens.c.family_id == str(uuid.UUID(match.group(1))))
        .limit(_FAMILY_MAX)
    ).all()
    row = next((r for r in rows if hasher.matches(token, r)), None)
    if row is None:
        return None
    return RefreshRecord(
        row.token_hash,
        row.family_id,
        row.realm,
        row.user_id,
        float(row.issued_at),
        float(row.expires_at),
        float(row.family_expires_at),
        bool(row.used),
        bool(row.revoked),
    )


def mark_used(conn: Connection, record: RefreshRecord) -> bool:
    """Atomically claim a token; False if someone used it first (reuse)."""
    result = conn.execute(
        sa.update(tables.refresh_tokens)
        .where(
            tables.refresh_tokens.c.token_hash == record.token_hash,
            tables.refresh_tokens.c.used.is_(False),
        )
        .values(used=True)
    )
    return result.rowcount == 1


def revoke_family(conn: Connection, family_id: str) -> int:
    return conn.execute(
        sa.update(tables.refresh_tokens)
        .where(tables.refresh_tokens.c.family_id == family_id)
        .values(revoked=True)
    ).rowcount


def revoke_user(conn: Connection, user_id: str) -> int:
    return conn.execute(
        sa.update(tables.refresh_tokens)
        .where(tables.refresh_tokens.c.user_id == user_id)
        .values(revoked=True)
    ).rowcount


def purge_expired(conn: Connection) -> None:
    conn.execute(
        sa.delete(tables.refresh_tokens).where(
            tables.refresh_tokens.c.family_expires_at < time.time() - 86400
        )
    )
