"""``sqlite:///path`` and ``postgresql+psycopg://...``: the SQL key store.

This module is the plugin (its hooks only, so loading it imports no database code). The
store's code is registered by reference and imported when a store of its scheme opens:

* ``sqlite`` → :func:`qimem.builtin_plugins.sql.sqlite.open_store`: the standard
  library's ``sqlite3`` on the hot path (resolving and unwrapping keys, usage
  reservations, listings), SQLAlchemy and Alembic only for writes, migrations and the
  identity layer (see docs/performance.md, "The embedded store's hot path");
* PostgreSQL → :class:`qimem.builtin_plugins.sql.store.SqlKeyStore` on SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from qimem.hooks import hookimpl
from qimem.registry import RegisterKeyStore

SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgres")


@hookimpl
def qimem_register_keystores(register: RegisterKeyStore) -> None:
    register("sqlite", "qimem.builtin_plugins.sql.backend:open_sqlite")
    for scheme in SCHEMES[1:]:
        register(scheme, "qimem.builtin_plugins.sql.backend:open_sql")


@hookimpl
def qimem_plugin_manifest() -> dict[str, object]:
    return {
        "name": "sql-keystore",
        "version": "1.0.0",
        "description": "SQL key store: SQLite (embedded default, sqlite3 hot path) and "
        "PostgreSQL (SQLAlchemy)",
        "provides": {"keystores": list(SCHEMES)},
        "qimem_api": ">=1,<2",
    }


def __getattr__(name: str) -> Any:
    if name == "SqlKeyStore":  # the class, for code that imported it from here
        from qimem.builtin_plugins.sql.store import SqlKeyStore

        return SqlKeyStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
