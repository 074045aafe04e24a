"""Alembic migrations of the SQL store schema (``alembic`` script location ``qimem:migrations``)."""

#: The newest revision; stores compare against it to skip Alembic when already current.
HEAD = "0005"
