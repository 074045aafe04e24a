"""SQLAlchemy engines for the SQL store: SQLite (WAL) and PostgreSQL, one schema, Alembic.

The same code serves ``sqlite:///path`` and ``postgresql+psycopg://...``. Schema changes go
only through the Alembic migrations in :mod:`qimem.builtin_plugins.sql.migrations` (they live
with the SQL store), applied by ``qimem init`` and when a store opens a database that is
behind.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from qimem.errors import ConfigError, StoreUnavailableError
from qimem.sqlite_files import (
    SQLITE_SUFFIXES,
    SQLITE_TIMEOUT,
    check_sqlite_permissions,
    enable_wal,
    prepare_sqlite_file,
    secure_sqlite_files,
    space_detail,
)

#: The Alembic script location of the schema (keys, identity, plugin catalog): the
#: migrations live with the SQL store, in :mod:`qimem.builtin_plugins.sql.migrations`.
MIGRATIONS = "qimem.builtin_plugins.sql:migrations"


def _head() -> str:
    """The newest schema revision (from the SQL store's migrations package)."""
    from qimem.builtin_plugins.sql.migrations import HEAD

    return HEAD


__all__ = [
    "SQLITE_SUFFIXES",
    "check_sqlite_permissions",
    "create_engine",
    "current_revision",
    "migrate",
    "normalize_url",
    "prepare_sqlite_file",
    "secure_sqlite_files",
    "sqlite_database",
    "translate_errors",
]
#: Seconds to wait for a PostgreSQL connection (TCP, TLS and authentication) before the
#: request fails with "store unavailable"; ``?connect_timeout=N`` in the store URL overrides
#: it (libpq counts at least 2). Without it psycopg waits 130 s for a server that accepts
#: connections but never answers (a black-holed network or a hung proxy).
PG_CONNECT_TIMEOUT = 5
#: TCP keepalives and a send timeout for PostgreSQL connections (each overridable in the
#: URL's query): a connection whose server vanished mid-query (a crashed host, a dropped
#: route) fails after ~25 s instead of waiting for the kernel's TCP timeout (minutes).
PG_TCP_DEFAULTS = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # ms
}
_PG_MIGRATION_LOCK = 0x71696D656D  # "qimem": serializes concurrent migrations on PostgreSQL
_MIGRATION_THREAD_LOCK = threading.Lock()  # Alembic's context is process-global


def normalize_url(url: str) -> str:
    """Map ``postgresql://`` and ``postgres://`` onto the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_engine(url: str) -> Engine:
    """An engine for ``url`` with qimem's connection settings."""
    url = normalize_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ConfigError("the store URL is not a valid database URL") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            raise ConfigError("an SQLite store needs a file path: sqlite:///path/to/qimem.db")
        prepare_sqlite_file(Path(database))
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_TIMEOUT})
        sa.event.listen(engine, "handle_error", _sqlite_error_detail(Path(database)))

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            enable_wal(cursor)
            cursor.execute("PRAGMA synchronous=FULL")  # a key must survive a power cut
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if parsed.get_backend_name() == "postgresql":
        defaults = {"connect_timeout": PG_CONNECT_TIMEOUT, **PG_TCP_DEFAULTS}
        connect_args = {k: v for k, v in defaults.items() if k not in parsed.query}
        try:
            return sa.create_engine(
                url,
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=20,
                connect_args=connect_args,
            )
        except ModuleNotFoundError:
            raise ConfigError(
                "PostgreSQL stores need psycopg 3: pip install 'qimem[postgres]'"
            ) from None
    raise ConfigError(f"unsupported database backend {parsed.get_backend_name()!r}")


def sqlite_database(url: str) -> Path | None:
    """The database file of an ``sqlite:///path`` store URL, else None."""
    try:
        parsed = sa.engine.make_url(normalize_url(url))
    except sa.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _sqlite_error_detail(database: Path) -> Any:
    """A ``handle_error`` listener that notes SQLite's own message (a fixed text, never
    data) on the exception, and whether the store's file system is full, for
    :func:`translate_errors`."""

    def listener(context: Any) -> None:
        orig = context.original_exception
        detail = space_detail(orig, database)
        with contextlib.suppress(AttributeError, TypeError):
            orig.qimem_detail = detail

    return listener


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn a lost or refused database connection into StoreUnavailableError."""
    try:
        yield
    except OperationalError as exc:
        detail = getattr(exc.orig, "qimem_detail", None) or type(exc.orig).__name__
        raise StoreUnavailableError(f"the key store is unavailable ({detail})") from None
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise StoreUnavailableError("the key store connection was lost") from None
        raise


def current_revision(connection: Connection) -> str | None:
    """The Alembic revision of the database, or None before the first migration."""
    if not sa.inspect(connection).has_table("alembic_version"):
        return None
    return connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(
    engine: Engine, *, after_upgrade: Callable[[Connection, str | None], None] | None = None
) -> bool:
    """Bring the schema to the newest revision; True if anything ran.

    ``after_upgrade(connection, from_revision)`` runs inside the migration's transaction,
    after the upgrade, only in the process that ran it (the key store passes the one that
    seals authorization rows which predate their MAC column, holding the root key).

    Safe to call from many threads and processes at once on a fresh database: exactly one
    runs the migrations, the others wait for it and return False. Alembic's context is
    process-global, so threads take a lock; processes serialize on the database itself
    (an advisory lock on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite).
    """
    with translate_errors(), engine.connect() as connection:
        if current_revision(connection) == _head():
            return False
    sqlite = engine.dialect.name == "sqlite"
    with _MIGRATION_THREAD_LOCK, translate_errors(), engine.connect() as connection:
        if sqlite:
            # Alembic's batch mode recreates SQLite tables (copy, drop, rename); with foreign
            # keys enforced, dropping a referenced table fails. The pragma is a no-op inside a
            # transaction, so it is set before, and the keys are checked before commit.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if sqlite:
                    # Take the write lock before reading the revision; Alembic's DDL then
                    # runs in this one transaction (pysqlite does not commit on DDL).
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                else:
                    connection.execute(
                        sa.text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
                    )
                from_revision = current_revision(connection)
                if from_revision == _head():
                    return False
                from alembic import command
                from alembic.config import Config

                config = Config()
                config.set_main_option("script_location", MIGRATIONS)
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
                if after_upgrade is not None:
                    after_upgrade(connection, from_revision)
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise ConfigError("a migration left rows violating foreign keys")
                return True
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
