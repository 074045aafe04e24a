"""Identity tables (mirroring migrations 0002, 0005 and 0008) and the database identity runs on.

A store's backend (:class:`qimem.backend.Backend`) says which database identity uses: the
SQL store's own (:meth:`Database.for_engine`); for ``memory://``, a private in-memory SQLite
database (:meth:`Database.in_memory`: one connection, serialized by a lock) that lives and
dies with the process, exactly like the keys.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from qimem.sql import migrate, read_engine, sqlite_explicit_begin, translate_errors

metadata = sa.MetaData()

realms = sa.Table(
    "qimem_realms",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
)
users = sa.Table(
    "qimem_users",
    metadata,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("username", sa.String(128), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(512), nullable=False),
    sa.Column("enabled", sa.Boolean, nullable=False),
    sa.Column("failed_logins", sa.Integer, nullable=False),
    sa.Column("locked_until", sa.Float, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Access tokens of this user issued at or before this time are refused (migration 0005).
    sa.Column("tokens_valid_after", sa.Float, nullable=False, server_default="0"),
    sa.Column("mac", sa.String(64), nullable=True),
)
roles = sa.Table(
    "qimem_roles",
    metadata,
    sa.Column("realm", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("permissions", sa.String(1024), nullable=False),
    sa.Column("builtin", sa.Boolean, nullable=False),
    sa.Column("description", sa.String(256), nullable=False),
    sa.Column("mac", sa.String(64), nullable=True),
)
grants = sa.Table(
    "qimem_grants",
    metadata,
    sa.Column("realm", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("role", sa.String(64), primary_key=True),
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("mac", sa.String(64), nullable=True),
)
signing_keys = sa.Table(
    "qimem_signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("public_key", sa.String(64), nullable=False),
    sa.Column("private_wrapped", sa.LargeBinary, nullable=False),
    sa.Column("active", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retire_at", sa.Float, nullable=True),
)
refresh_tokens = sa.Table(
    "qimem_refresh_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("family_id", sa.String(36), nullable=False),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("issued_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("family_expires_at", sa.Float, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
)
revoked_tokens = sa.Table(
    "qimem_revoked_tokens",
    metadata,
    sa.Column("jti", sa.String(64), primary_key=True),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float, nullable=False),
)
audit = sa.Table(
    "qimem_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("actor", sa.String(160), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(200), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("detail", sa.String(1024), nullable=False),
    # Unique per record, given when it is made: replays insert it once (migration 0006).
    sa.Column("record_id", sa.String(36), nullable=True),  # unique index ux_audit_record_id
)


class Database:
    """An engine plus the transaction helper every identity module uses."""

    def __init__(self, engine: Engine, *, serialize: bool = False, owned: bool = False) -> None:
        self.engine = engine
        self._owned = owned
        # One shared SQLite connection (in-memory mode) must not run two transactions at once.
        self._lock: threading.RLock | None = threading.RLock() if serialize else None
        # PostgreSQL reads in autocommit mode (qimem.sql.read_engine); None elsewhere.
        reads = read_engine(engine)
        self._reads = reads if reads is not engine else None

    @classmethod
    def in_memory(cls) -> Database:
        """A private in-memory SQLite database with the full schema."""
        engine = sa.create_engine(
            "sqlite://",
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        sqlite_explicit_begin(engine)  # a savepoint must not commit (qimem.sql)
        migrate(engine)
        return cls(engine, serialize=True, owned=True)

    @classmethod
    def for_engine(cls, engine: Engine) -> Database:
        """Identity on an existing key store engine (migrated to HEAD if behind)."""
        migrate(engine)
        return cls(engine)

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; database outages become StoreUnavailableError."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            with translate_errors(), self.engine.begin() as conn:
                yield conn
        finally:
            if lock is not None:
                lock.release()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for statements that only read and need no common snapshot: on
        PostgreSQL without a transaction (one round trip per statement instead of three),
        elsewhere :meth:`begin`'s transaction. Never write through it."""
        if self._reads is None:
            with self.begin() as conn:
                yield conn
            return
        with translate_errors(), self._reads.connect() as conn:
            yield conn

    def close(self) -> None:
        if self._owned:
            self.engine.dispose()

    def __repr__(self) -> str:
        return f"<identity Database {self.engine.dialect.name}>"


# -- migration 0008: secret rotation overlap, the second factor -------------------------

client_secrets = sa.Table(
    "qimem_client_secrets",
    metadata,
    sa.Column("secret_id", sa.String(36), primary_key=True),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("secret_hash", sa.String(512), nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)
otp = sa.Table(
    "qimem_otp",
    metadata,
    sa.Column("user_id", sa.String(36), primary_key=True),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("secret_wrapped", sa.LargeBinary, nullable=False),
    sa.Column("confirmed", sa.Boolean, nullable=False),
    sa.Column("last_step", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)
otp_recovery = sa.Table(
    "qimem_otp_recovery",
    metadata,
    sa.Column("code_hash", sa.String(64), primary_key=True),
    sa.Column("user_id", sa.String(36), nullable=False),
    sa.Column("realm", sa.String(64), nullable=False),
    sa.Column("used", sa.Boolean, nullable=False),
)
realm_policy = sa.Table(
    "qimem_realm_policy",
    metadata,
    sa.Column("realm", sa.String(64), primary_key=True),
    sa.Column("otp_required", sa.Boolean, nullable=False),
    sa.Column("mac", sa.String(64), nullable=False),
)
