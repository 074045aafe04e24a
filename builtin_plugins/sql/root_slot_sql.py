"""An SQL store's root keyring row (:class:`qimem.root.keyring.RootSlot`) through
SQLAlchemy (PostgreSQL, and SQLite's full store): the one row of ``qimem_root_keyring``,
changed only by compare-and-set on its generation."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from qimem.sql import READ_ONLY, translate_errors

_metadata = sa.MetaData()
root_keyring = sa.Table(
    "qimem_root_keyring",
    _metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
)


class SqlRootSlot:
    """The keyring row, through SQLAlchemy (PostgreSQL, and SQLite's full store)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    def read(self) -> str | None:
        query = sa.select(root_keyring.c.document).where(root_keyring.c.id == 1)
        # A read-only transaction: a wrap may refresh the keyring inside a write
        # transaction of its own thread (SQLite's BEGIN IMMEDIATE would wait for that one).
        with translate_errors(), self._engine.connect() as conn:
            conn.execution_options(**{READ_ONLY: True})
            found = conn.execute(query).scalar()
        return None if found is None else str(found)

    def replace(self, old: str | None, new: str) -> bool:
        with translate_errors(), self._engine.begin() as conn:
            if old is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            sa.insert(root_keyring).values(id=1, document=new, generation=1)
                        )
                except IntegrityError:
                    return False
                return True
            row = conn.execute(
                sa.select(root_keyring.c.document, root_keyring.c.generation)
                .where(root_keyring.c.id == 1)
                .with_for_update()
            ).first()
            if row is None or row.document != old:
                return False
            done = conn.execute(
                sa.update(root_keyring)
                .where(root_keyring.c.id == 1, root_keyring.c.generation == row.generation)
                .values(document=new, generation=row.generation + 1)
            )
            return bool(done.rowcount == 1)

    def __repr__(self) -> str:
        return "<SqlRootSlot>"
