"""SQLAlchemy engines for the SQL store: SQLite (WAL) and PostgreSQL, one schema, Alembic.

The same code serves ``sqlite:///path`` and ``postgresql+psycopg://...``. Schema changes go
only through the Alembic migrations in :mod:`qimem.builtin_plugins.sql.migrations` (they live
with the SQL store), applied by ``qimem init`` and when a store opens a database that is
behind.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from qimem.errors import ConfigError, StoreUnavailableError, ValidationError
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
    "sqlite_explicit_begin",
    "sqlite_foreign_keys",
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
        sqlite_explicit_begin(engine)

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
            engine = sa.create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)
        except ModuleNotFoundError:
            raise ConfigError(
                "PostgreSQL stores need psycopg 3: pip install 'qimem[postgres]'"
            ) from None
        ping_idle_connections(engine)
        return engine
    raise ConfigError(f"unsupported database backend {parsed.get_backend_name()!r}")


def read_engine(engine: Engine) -> Engine:
    """``engine`` for reads that need no transaction around them (one statement, or
    statements that need not see one snapshot: PostgreSQL's READ COMMITTED gives each
    statement its own anyway). On PostgreSQL its connections run in autocommit mode, one
    round trip per statement instead of ``BEGIN``, statement, ``ROLLBACK`` (about 0.2 ms
    of wall time and 0.1 ms of CPU less per read, measured on loopback); the pool is
    ``engine``'s (SQLAlchemy's documented ``execution_options(isolation_level=...)``
    copy). Other dialects get ``engine`` itself. Write through it only in single
    statements (each is its own transaction on PostgreSQL): nothing would make two
    statements atomic."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


#: A pooled PostgreSQL connection idle for longer than this is pinged before it is used.
PING_AFTER_IDLE = 1.0


def ping_idle_connections(engine: Engine, idle: float = PING_AFTER_IDLE) -> None:
    """Pessimistic disconnect handling for connections that sat idle: SQLAlchemy's
    ``pool_pre_ping`` pings on every checkout, one more round trip per transaction; here
    a connection checked in less than ``idle`` seconds ago is used as it is. A restart of
    the server in that window surfaces as one failed statement (503
    ``store_unavailable``), after which SQLAlchemy invalidates the whole pool; every
    connection that waited longer (the usual case after an outage) is pinged and, when
    dead, replaced before use (a ``DisconnectionError`` from the ``checkout`` event makes
    the pool retry with a fresh connection: SQLAlchemy's documented pessimistic recipe).
    """
    clock = time.monotonic

    @sa.event.listens_for(engine, "connect")
    @sa.event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection: Any, record: Any) -> None:
        if record is not None:  # a fresh connection counts as just used
            record.info["qimem_checked_in"] = clock()

    @sa.event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if clock() - record.info.get("qimem_checked_in", 0.0) < idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            raise sa.exc.DisconnectionError("the pooled connection is dead") from exc


#: Execution option of a connection whose transactions only read: on SQLite they start
#: with a deferred ``BEGIN`` instead of ``BEGIN IMMEDIATE`` (:func:`sqlite_explicit_begin`).
READ_ONLY = "qimem_read_only"


def sqlite_explicit_begin(engine: Engine) -> None:
    """Make ``engine``'s SQLite transactions real ones: SQLAlchemy's documented recipe for
    pysqlite ("Serializable isolation / Savepoints / Transactional DDL").

    pysqlite's own transaction control emits ``BEGIN`` only before an INSERT, UPDATE or
    DELETE, and none for ``SAVEPOINT``: a savepoint opened before a transaction's first
    write is then the transaction itself, and its ``RELEASE`` commits. ``users.create``
    (an INSERT in a savepoint, then the row's MAC) published a user without its MAC to
    concurrent logins, and kept it if a later step failed. Here pysqlite's control is off
    (``isolation_level = None``) and each SQLAlchemy transaction starts with
    ``BEGIN IMMEDIATE``: every transaction of this engine holds the write lock from its
    start. Many of them read then write (``lock_user_row`` after a lookup, rotations, the
    lockout counters); a deferred ``BEGIN`` would give them a read snapshot that cannot be
    upgraded once another connection has committed (``SQLITE_BUSY_SNAPSHOT``, with no
    busy wait), where they used to wait for the lock. WAL readers outside these
    transactions (the stdlib ``sqlite3`` hot path of the key store) are not blocked.
    """

    @sa.event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Connection) -> None:
        # A read-only transaction (execution option READ_ONLY) takes no write lock: it must
        # not wait behind a write transaction of its own thread (a wrap refreshing the
        # root keyring inside one), and WAL readers are never blocked by writers.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def sqlite_foreign_keys(connection: Connection, enforced: bool) -> None:
    """Turn SQLite's foreign-key enforcement on ``connection`` on or off (Alembic's batch
    mode recreates tables that others reference). The pragma is a no-op inside a
    transaction, so it runs on the driver connection, outside SQLAlchemy's transaction
    (which would emit ``BEGIN`` first: :func:`sqlite_explicit_begin`); ``connection`` must
    not be in one."""
    if connection.in_transaction():
        raise RuntimeError("PRAGMA foreign_keys is a no-op inside a transaction")
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys={'ON' if enforced else 'OFF'}")
    if getattr(driver, "in_transaction", False):  # not possible with isolation_level None
        driver.commit()


def _pysqlite_controls_transactions(connection: Connection) -> bool:
    """Whether ``connection``'s engine lacks :func:`sqlite_explicit_begin`."""
    return getattr(connection.connection.driver_connection, "isolation_level", None) is not None


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
    except DataError as exc:
        if "NUL" in str(exc.orig):  # PostgreSQL text cannot hold U+0000: nothing is named so
            raise ValidationError(
                "text with a NUL character (U+0000) names nothing here", code="invalid_text"
            ) from None
        raise
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
            sqlite_foreign_keys(connection, False)
        try:
            with connection.begin():
                # On SQLite the write lock is taken before the revision is read, and
                # Alembic's DDL runs in this one transaction: sqlite_explicit_begin's
                # BEGIN IMMEDIATE, or (an engine without it) an explicit one.
                if sqlite:
                    if _pysqlite_controls_transactions(connection):
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
                sqlite_foreign_keys(connection, True)
