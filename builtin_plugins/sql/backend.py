"""The SQL store's backend: keys, identity database, plugin catalog and migrations, all in
the store's own database (SQLite or PostgreSQL). SQLAlchemy is imported only when one of
them needs it (the SQLite hot path uses ``sqlite3``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qimem.backend import Backend

if TYPE_CHECKING:
    from qimem.builtin_plugins.sql.catalog import SqlCatalog
    from qimem.builtin_plugins.sql.notify import PgChangeFeed
    from qimem.builtin_plugins.sql.sqlite import SqliteKeyStore
    from qimem.builtin_plugins.sql.store import SqlKeyStore
    from qimem.identity.db import Database
    from qimem.root.columns import RootRows
    from qimem.rootkey import KeyWrapper


def sql_backend(store: SqlKeyStore | SqliteKeyStore, wrapper: KeyWrapper, scheme: str) -> Backend:
    """The backend of an SQL key store, whose ``engine`` is the SQLAlchemy engine of the
    store's database (built on first use by the SQLite store). On PostgreSQL it has a
    change feed (``LISTEN/NOTIFY``, :mod:`~qimem.builtin_plugins.sql.notify`); SQLite's
    caches poll."""

    def identity_database() -> Database:
        from qimem.identity.db import Database

        return Database.for_engine(store.engine)

    def catalog() -> SqlCatalog:
        from qimem.builtin_plugins.sql.catalog import SqlCatalog

        return SqlCatalog(store.engine)

    def migrate() -> None:
        from qimem.identity.authz_mac import sealing_after_upgrade
        from qimem.sql import migrate

        migrate(store.engine, after_upgrade=sealing_after_upgrade(wrapper))

    def changes() -> PgChangeFeed:
        from qimem.builtin_plugins.sql.notify import PgChangeFeed
        from qimem.builtin_plugins.sql.tables import MARKER_SQL

        return PgChangeFeed(store.engine.url, MARKER_SQL)

    def root_rows() -> RootRows:
        from qimem.identity.root_columns import wrapped_columns
        from qimem.root.columns import RootRows

        return RootRows(store.engine, [*store.root_wrapped_columns(), *wrapped_columns()])

    return Backend(
        store,
        scheme=scheme,
        root_rows=root_rows,
        identity_database=identity_database,
        catalog=catalog,
        migrate=migrate,
        identity_with_keys=True,
        changes=changes if scheme != "sqlite" else None,
    )


def open_sqlite(url: str, wrapper: KeyWrapper) -> Backend:
    """The backend factory of the ``sqlite`` scheme."""
    from qimem.builtin_plugins.sql.sqlite import open_store

    return sql_backend(open_store(url, wrapper), wrapper, "sqlite")


def open_sql(url: str, wrapper: KeyWrapper) -> Backend:
    """The backend factory of the PostgreSQL schemes (SQLAlchemy)."""
    from qimem.builtin_plugins.sql.store import SqlKeyStore

    return sql_backend(SqlKeyStore(url, wrapper), wrapper, url.split(":", 1)[0])
