"""The SQL store's plugin catalog: registered manifests in table ``qimem_plugins``."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from qimem.backend import already_registered

if TYPE_CHECKING:
    from qimem.manifest import Manifest

plugins_table = sa.Table(
    "qimem_plugins",
    sa.MetaData(),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),
    sa.Column("registered_at", sa.Float, nullable=False),
)


class SqlCatalog:
    """Registered plugin manifests in the store's database (migration 0003)."""

    def __init__(self, engine: sa.engine.Engine) -> None:
        from qimem.sql import migrate

        migrate(engine)  # one query when the store is already current
        self._engine = engine

    def all(self) -> dict[str, dict[str, Any]]:
        from qimem.sql import translate_errors

        with translate_errors(), self._engine.connect() as conn:
            rows = conn.execute(sa.select(plugins_table.c.name, plugins_table.c.manifest)).all()
        return {name: json.loads(text) for name, text in rows}

    def add(self, found: Manifest) -> None:
        from qimem.sql import translate_errors

        row = {
            "name": found.name,
            "version": found.version,
            "manifest": json.dumps(found.to_dict(), sort_keys=True),
            "registered_at": time.time(),
        }
        try:
            with translate_errors(), self._engine.begin() as conn:
                conn.execute(plugins_table.insert().values(**row))
        except sa.exc.IntegrityError:
            raise already_registered(found.name) from None

    def remove(self, name: str) -> bool:
        from qimem.sql import translate_errors

        with translate_errors(), self._engine.begin() as conn:
            result = conn.execute(plugins_table.delete().where(plugins_table.c.name == name))
        return bool(result.rowcount)
