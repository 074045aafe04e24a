"""The SQL store, all in one place: SQLite (embedded default) and PostgreSQL.

* :mod:`~qimem.builtin_plugins.sql.backend`: the store plugin's factories
  (:func:`~qimem.builtin_plugins.sql.backend.open_sqlite`,
  :func:`~qimem.builtin_plugins.sql.backend.open_sql`), returning a
  :class:`qimem.backend.Backend` whose keys, identity database, plugin catalog and
  migrations all live in the store's database;
* :mod:`~qimem.builtin_plugins.sql.store`: the SQLAlchemy key store (PostgreSQL, and every
  write of SQLite), its tables (:mod:`~qimem.builtin_plugins.sql.tables`), its usage
  accounting (:mod:`~qimem.builtin_plugins.sql.usage`) and its cache-miss reads
  (:mod:`~qimem.builtin_plugins.sql.cache_reads`);
* :mod:`~qimem.builtin_plugins.sql.sqlite`: the SQLite store's ``sqlite3`` hot path;
* :mod:`~qimem.builtin_plugins.sql.catalog`: registered plugin manifests (``qimem_plugins``);
* :mod:`~qimem.builtin_plugins.sql.migrations`: the Alembic migrations of the whole schema
  (keys, identity, plugins), script location ``qimem.builtin_plugins.sql:migrations``.

The plugin itself (its hooks) is :mod:`qimem.builtin_plugins.sql_keystore`.
"""
