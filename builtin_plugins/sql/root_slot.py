"""Where an SQLite store keeps its root keyring (:class:`qimem.root.keyring.RootSlot`)
on the hot path: the one row of ``qimem_root_keyring`` through the standard library's
``sqlite3`` (:mod:`qimem.builtin_plugins.sql.root_slot_sql` is the SQLAlchemy twin)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any


class SqliteRootSlot:
    """The keyring row, through the standard library's ``sqlite3`` (the SQLite hot path)."""

    def __init__(
        self,
        query: Callable[[str, tuple[Any, ...]], list[tuple[Any, ...]]],
        write: Callable[[], AbstractContextManager[sqlite3.Connection]],
    ) -> None:
        self._query = query
        self._write = write

    def read(self) -> str | None:
        rows = self._query("SELECT document FROM qimem_root_keyring WHERE id = 1", ())
        return str(rows[0][0]) if rows else None

    def replace(self, old: str | None, new: str) -> bool:
        with self._write() as conn:
            row = conn.execute(
                "SELECT document, generation FROM qimem_root_keyring WHERE id = 1"
            ).fetchone()
            if old is None:
                if row is not None:
                    return False
                conn.execute(
                    "INSERT INTO qimem_root_keyring (id, document, generation) VALUES (1, ?, 1)",
                    (new,),
                )
                return True
            if row is None or row[0] != old:
                return False
            conn.execute(
                "UPDATE qimem_root_keyring SET document = ?, generation = ? WHERE id = 1",
                (new, row[1] + 1),
            )
            return True

    def __repr__(self) -> str:
        return "<SqliteRootSlot>"
