"""Alembic migrations of the SQL store schema (keys, identity, plugin catalog).

Alembic script location ``qimem.builtin_plugins.sql:migrations`` (:data:`qimem.sql.MIGRATIONS`).
"""

#: The newest revision; stores compare against it to skip Alembic when already current.
HEAD = "0010"
