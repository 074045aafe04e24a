"""Refresh tokens: opaque random strings, stored only as SHA-256, rotated on every use.

All refresh tokens descending from one login form a *family*. Using a token marks it used
and issues its successor; presenting a used token again (a stolen copy racing the real
client) revokes the whole family, so both parties must log in again.
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from qimem.identity import db as tables

PREFIX = "qrt_"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RefreshRecord:
    token_hash: str
    family_id: str
    realm: str
    user_id: str
    expires_at: float
    family_expires_at: float
    used: bool
    revoked: bool


def issue(
    conn: Connection,
    realm: str,
    user_id: str,
    ttl: int,
    *,
    family_id: str | None = None,
    family_expires_at: float | None = None,
    session_max: int = 36000,
) -> tuple[str, float]:
    """A new refresh token (returned once, in the clear) and its expiry."""
    now = time.time()
    token = PREFIX + secrets.token_urlsafe(32)
    family_end = family_expires_at if family_expires_at is not None else now + session_max
    expires = min(now + ttl, family_end)
    conn.execute(
        sa.insert(tables.refresh_tokens).values(
            token_hash=token_hash(token),
            family_id=family_id or str(uuid.uuid4()),
            realm=realm,
            user_id=user_id,
            issued_at=now,
            expires_at=expires,
            family_expires_at=family_end,
            used=False,
            revoked=False,
        )
    )
    return token, expires


def find(conn: Connection, token: str) -> RefreshRecord | None:
    if not isinstance(token, str) or not token.startswith(PREFIX) or len(token) > 200:
        return None
    row = conn.execute(
        sa.select(tables.refresh_tokens).where(
            tables.refresh_tokens.c.token_hash == token_hash(token)
        )
    ).first()
    if row is None:
        return None
    return RefreshRecord(
        row.token_hash,
        row.family_id,
        row.realm,
        row.user_id,
        row.expires_at,
        row.family_expires_at,
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
