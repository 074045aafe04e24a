"""Usage accounting of the SQL key store (:class:`~qimem.builtin_plugins.sql.store.SqlKeyStore`):
the per-version encryption counts behind usage limits (docs/keys.md "Usage limits")."""

from __future__ import annotations

import sqlalchemy as sa

from qimem.builtin_plugins.sql.tables import versions
from qimem.errors import NotFoundError
from qimem.sql import translate_errors


class SqlUsageAccounting:
    """Reserve, release and read usage counts (a mixin of the SQL key store, which
    provides the engines)."""

    engine: sa.Engine
    _reads: sa.Engine  # qimem.sql.read_engine(engine)

    def reserve_usage(self, realm: str, key_id: str, count: int, limit: int) -> int:
        if self.engine.dialect.name == "postgresql":
            return self._reserve_in_one_statement(realm, key_id, count, limit)
        with translate_errors(), self.engine.begin() as conn:
            # The UPDATE takes the row lock first, so concurrent reservations serialize.
            conn.execute(
                sa.update(versions)
                .where(versions.c.key_id == key_id, versions.c.realm == realm)
                .values(encryptions=versions.c.encryptions + 0)
            )
            used = conn.execute(
                sa.select(versions.c.encryptions).where(
                    versions.c.key_id == key_id, versions.c.realm == realm
                )
            ).scalar()
            if used is None:
                raise NotFoundError(f"no key {key_id!r}")
            granted = max(0, min(count, limit - int(used)))
            if granted:
                conn.execute(
                    sa.update(versions)
                    .where(versions.c.key_id == key_id)
                    .values(encryptions=versions.c.encryptions + granted)
                )
        return granted

    def _reserve_in_one_statement(self, realm: str, key_id: str, count: int, limit: int) -> int:
        """PostgreSQL: lock the row, add what fits under ``limit`` and return the count
        before, in one ``WITH ... SELECT ... FOR UPDATE`` + ``UPDATE ... RETURNING``
        statement, sent in autocommit mode: one round trip (the statement is its own
        transaction) where BEGIN, lock, read, add and COMMIT were five."""
        before = (
            sa.select(versions.c.key_id, versions.c.encryptions)
            .where(versions.c.key_id == key_id, versions.c.realm == realm)
            .with_for_update()
            .cte("before")
        )
        fits = sa.func.least(count, sa.func.greatest(0, limit - before.c.encryptions))
        statement = (
            sa.update(versions)
            .where(versions.c.key_id == before.c.key_id)
            .values(encryptions=versions.c.encryptions + fits)
            .returning(before.c.encryptions)
        )
        with translate_errors(), self._reads.connect() as conn:
            used = conn.execute(statement).scalar()
        if used is None:
            raise NotFoundError(f"no key {key_id!r}")
        return max(0, min(count, limit - int(used)))

    def release_usage(self, realm: str, key_id: str, count: int) -> None:
        if count <= 0:
            return
        statement = (
            sa.update(versions)
            .where(versions.c.key_id == key_id, versions.c.realm == realm)
            .values(
                encryptions=sa.case(
                    (versions.c.encryptions > count, versions.c.encryptions - count),
                    else_=0,
                )
            )
        )
        # One statement: on PostgreSQL, sent in autocommit mode (it is its own transaction).
        with translate_errors(), self._reads.begin() as conn:
            conn.execute(statement)

    def usage(self, realm: str, lineage_id: str) -> dict[str, int]:
        query = sa.select(versions.c.key_id, versions.c.encryptions).where(
            versions.c.lineage_id == lineage_id, versions.c.realm == realm
        )
        with translate_errors(), self._reads.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            raise NotFoundError(f"no key {lineage_id!r}")
        return {row.key_id: int(row.encryptions) for row in rows}
