"""The SQL key store on SQLAlchemy 2.x: PostgreSQL, and SQLite's writes and administration.

Registered by :mod:`qimem.builtin_plugins.sql_keystore`. A ``sqlite:///path`` store opens
as :class:`qimem.builtin_plugins.sql.sqlite.SqliteKeyStore`, whose hot path (reads, usage
reservations) runs on the standard library's ``sqlite3`` and which hands everything else
to this class.

One row per key version, material wrapped under the root key. Rotation is one transaction
whose first statement is the compare-and-swap ``UPDATE ... WHERE key_id = ? AND state =
'active'``: it takes the write lock (SQLite) or the row lock (PostgreSQL) before anything
is read, so concurrent rotations of one key_id serialize and exactly one finds the row
still active. The unique (lineage_id, version) constraint is the backstop.
"""

from __future__ import annotations

import builtins
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from qimem.builtin_plugins.sql.cache_reads import SqlCacheReads
from qimem.builtin_plugins.sql.tables import (
    SELECT_VERSIONS,
    STATE_MARKER,
    lineages,
    meta_table,
    policy_values,
    to_policy,
    to_version,
    versions,
    wrap_context,
)
from qimem.builtin_plugins.sql.usage import SqlUsageAccounting
from qimem.errors import ConfigError, ConflictError, KeyNotActiveError, NotFoundError
from qimem.invalidation import LINEAGE, ROTATION, Change, notice, notify
from qimem.keys import (
    KeyState,
    KeyVersion,
    LineagePolicy,
    LineageRecord,
    new_id,
    not_active_error,
)
from qimem.keystore import KeyStore, check_transition, destroyed_error
from qimem.rootkey import KeyWrapper
from qimem.sql import (
    check_sqlite_permissions,
    create_engine,
    migrate,
    read_engine,
    sqlite_database,
    translate_errors,
)

#: PostgreSQL: the rotation marker's change and its notice in one statement (a data-changing
#: WITH runs once, whatever the outer query reads).
_BUMP_AND_NOTIFY = sa.text(
    "WITH bumped AS (UPDATE qimem_meta SET value = :marker WHERE name = :name) "
    "SELECT pg_notify(:channel, :payload)"
)


_INSERT_VERSION = sa.insert(versions)  # built once: every rotation sends it
_other = versions.alias("other")
#: A rotation's compare-and-swap: the active ``key_id`` becomes decrypt-only, returning its
#: lineage, algorithm, the lineage's newest version number and its name (subqueries see the
#: rows as they were before the update; the state change does not alter either).
_SWAP = (
    sa.update(versions)
    .where(
        versions.c.key_id == sa.bindparam("swap_key_id"),
        versions.c.realm == sa.bindparam("swap_realm"),
        versions.c.state == KeyState.ACTIVE.value,
    )
    .values(state=KeyState.DECRYPT_ONLY.value)
)
_ROTATE_SWAP = _SWAP.returning(  # PostgreSQL
    versions.c.lineage_id,
    versions.c.algorithm,
    sa.select(sa.func.max(_other.c.version))
    .where(_other.c.lineage_id == versions.c.lineage_id)
    .scalar_subquery()
    .label("newest"),
    sa.select(lineages.c.name)
    .where(lineages.c.lineage_id == versions.c.lineage_id)
    .scalar_subquery()
    .label("name"),
)
_SWAP_ONLY = _SWAP.returning(versions.c.lineage_id, versions.c.algorithm)  # other stores


class SqlKeyStore(SqlCacheReads, SqlUsageAccounting, KeyStore):
    """Key versions in SQLite or PostgreSQL, material wrapped under the root key."""

    def __init__(self, url: str, wrapper: KeyWrapper, *, auto_migrate: bool = True) -> None:
        if wrapper is None:
            raise ConfigError("an SQL key store needs a root key (run 'qimem init')")
        self._wrapper = wrapper
        self.engine = create_engine(url)  # a new SQLite file is created 0600
        self._reads = read_engine(self.engine)  # the methods that only read
        database = sqlite_database(url)
        if database is not None:  # an existing one others can read is refused
            check_sqlite_permissions(database)
        if auto_migrate:
            from qimem.identity.authz_mac import sealing_after_upgrade

            migrate(self.engine, after_upgrade=sealing_after_upgrade(wrapper))
        from qimem.builtin_plugins.sql.root_slot_sql import SqlRootSlot

        wrapper.attach(SqlRootSlot(self.engine), fresh=self._stored_check() is None)
        self._check_root_key()
        self._ensure_meta(STATE_MARKER, new_id())

    def _ensure_meta(self, name: str, value: str) -> None:
        with translate_errors(), self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(meta_table.c.name).where(meta_table.c.name == name)
            ).first()
            if exists is None:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(meta_table).values(name=name, value=value))
                except IntegrityError:
                    pass  # another process inserted it first

    def rotation_marker(self) -> object:
        query = sa.select(meta_table.c.value).where(meta_table.c.name == STATE_MARKER)
        with translate_errors(), self._reads.connect() as conn:
            return conn.execute(query).scalar()

    def root_wrapped_columns(self) -> list[Any]:
        """The columns root rotation moves (:mod:`qimem.root.rotation`): key material."""
        from qimem.root.columns import WrappedColumn

        return [
            WrappedColumn(
                "qimem_key_versions",
                ("key_id",),
                "material",
                lambda r: wrap_context(r.realm, r.lineage_id, r.key_id, r.version, r.algorithm),
                "key versions",
            )
        ]

    def _stored_check(self) -> str | None:
        query = sa.select(meta_table.c.value).where(meta_table.c.name == "root_key_check")
        with translate_errors(), self._reads.connect() as conn:
            found = conn.execute(query).scalar()
        return None if found is None else str(found)

    def _check_root_key(self) -> None:
        """Record the root key's check value on first use; refuse a different root key."""
        check = self._wrapper.check_value
        with translate_errors(), self.engine.begin() as conn:
            stored = conn.execute(
                sa.select(meta_table.c.value).where(meta_table.c.name == "root_key_check")
            ).scalar()
            if stored is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            sa.insert(meta_table).values(name="root_key_check", value=check)
                        )
                except IntegrityError:
                    stored = conn.execute(
                        sa.select(meta_table.c.value).where(meta_table.c.name == "root_key_check")
                    ).scalar()
        if stored is not None and stored != check:
            raise ConfigError(
                "the root key does not match this store (wrong root key file or QIMEM_ROOT_KEY)"
            )

    def create(
        self, realm: str, algorithm: str, material: bytes | bytearray, *, name: str | None = None
    ) -> KeyVersion:
        now = datetime.now(UTC)
        version = KeyVersion(
            key_id=new_id(),
            lineage_id=new_id(),
            name=name,
            realm=realm,
            version=1,
            algorithm=algorithm,
            state=KeyState.ACTIVE,
            created_at=now,
        )
        try:
            with translate_errors(), self.engine.begin() as conn:
                conn.execute(
                    sa.insert(lineages).values(
                        lineage_id=version.lineage_id,
                        realm=realm,
                        name=name,
                        algorithm=algorithm,
                        created_at=now,
                    )
                )
                self._insert_version(conn, version, material)
        except IntegrityError:
            raise ConflictError(f"a key named {name!r} already exists", code="name_taken") from None
        return version

    def _insert_version(
        self, conn: sa.Connection, version: KeyVersion, material: bytes | bytearray
    ) -> None:
        wrapped = self._wrapper.wrap(
            material,
            wrap_context(
                version.realm,
                version.lineage_id,
                version.key_id,
                version.version,
                version.algorithm,
            ),
        )
        conn.execute(
            _INSERT_VERSION,
            {
                "key_id": version.key_id,
                "lineage_id": version.lineage_id,
                "realm": version.realm,
                "version": version.version,
                "algorithm": version.algorithm,
                "state": version.state.value,
                "material": wrapped,
                "created_at": version.created_at,
            },
        )

    def get(self, realm: str, key_id: str) -> KeyVersion:
        with translate_errors(), self._reads.connect() as conn:
            return self._get(conn, realm, key_id)

    def _get(self, conn: sa.Connection, realm: str, key_id: str) -> KeyVersion:
        row = conn.execute(
            SELECT_VERSIONS.where(versions.c.key_id == key_id, versions.c.realm == realm)
        ).first()
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        return to_version(row)

    def find_lineage(self, realm: str, ref: str) -> str:
        query = sa.select(lineages.c.lineage_id).where(
            lineages.c.realm == realm,
            sa.or_(lineages.c.name == ref, lineages.c.lineage_id == ref),
        )
        with translate_errors(), self._reads.connect() as conn:
            lineage_id = conn.execute(query).scalar()
        if lineage_id is None:
            raise NotFoundError(f"no key {ref!r}")
        return str(lineage_id)

    def versions(self, realm: str, lineage_id: str) -> list[KeyVersion]:
        query = SELECT_VERSIONS.where(
            versions.c.lineage_id == lineage_id, versions.c.realm == realm
        ).order_by(versions.c.version)
        with translate_errors(), self._reads.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            raise NotFoundError(f"no key {lineage_id!r}")
        return [to_version(row) for row in rows]

    def active_version(self, realm: str, lineage_id: str) -> KeyVersion:
        """The newest active version, read alone (a lineage may hold thousands)."""
        row = self._newest_active(
            SELECT_VERSIONS, versions.c.lineage_id == lineage_id, versions.c.realm == realm
        )
        if row is None:
            return super().active_version(realm, lineage_id)  # NotFound or not active
        return to_version(row)

    def _newest_active(self, select: sa.Select[Any], *where: Any) -> Any:
        """The row of ``select`` for the newest active version matching ``where``, or None."""
        query = (
            select.where(*where, versions.c.state == KeyState.ACTIVE.value)
            .order_by(versions.c.version.desc())
            .limit(1)
        )
        with translate_errors(), self._reads.connect() as conn:
            return conn.execute(query).first()

    def list(self, realm: str) -> list[KeyVersion]:
        newest = (
            sa.select(versions.c.lineage_id, sa.func.max(versions.c.version).label("version"))
            .where(versions.c.realm == realm)
            .group_by(versions.c.lineage_id)
            .subquery()
        )
        query = (
            SELECT_VERSIONS.join(
                newest,
                sa.and_(
                    versions.c.lineage_id == newest.c.lineage_id,
                    versions.c.version == newest.c.version,
                ),
            )
            .where(versions.c.realm == realm)
            .order_by(lineages.c.created_at, lineages.c.lineage_id)
        )
        with translate_errors(), self._reads.connect() as conn:
            return [to_version(row) for row in conn.execute(query)]

    def rotate(self, realm: str, key_id: str, material: bytes | bytearray) -> KeyVersion:
        try:
            with translate_errors(), self.engine.begin() as conn:
                swapped = self._swap_active(conn, realm, key_id)
                if swapped is None:
                    current = self._get(conn, realm, key_id)  # NotFoundError rolls back
                    active_row = conn.execute(
                        SELECT_VERSIONS.where(
                            versions.c.lineage_id == current.lineage_id,
                            versions.c.state == KeyState.ACTIVE.value,
                        )
                    ).first()
                    active = to_version(active_row) if active_row is not None else None
                    raise not_active_error(current, active)
                rotated = KeyVersion(
                    key_id=new_id(),
                    lineage_id=swapped.lineage_id,
                    name=swapped.name,
                    realm=realm,
                    version=swapped.newest + 1,
                    algorithm=swapped.algorithm,
                    state=KeyState.ACTIVE,
                    created_at=datetime.now(UTC),
                )
                self._insert_version(conn, rotated, material)
                self._bump_marker(conn, realm, swapped.lineage_id, kind=ROTATION)
        except IntegrityError:  # the unique (lineage, version) backstop
            raise KeyNotActiveError(
                f"key {key_id} was rotated concurrently; retry with the active version"
            ) from None
        return rotated

    def _swap_active(self, conn: sa.Connection, realm: str, key_id: str) -> Any:
        """A rotation's compare-and-swap: the row (``lineage_id``, ``algorithm``, the
        lineage's ``newest`` version number, its ``name``) if ``key_id`` was active and is
        now decrypt-only, else None. PostgreSQL answers in the one statement; on SQLite,
        where SQLAlchemy renders RETURNING without table names (which would uncorrelate
        the subqueries), a second statement reads the number and the name."""
        params = {"swap_key_id": key_id, "swap_realm": realm}
        if conn.dialect.name == "postgresql":
            return conn.execute(_ROTATE_SWAP, params).first()
        swapped = conn.execute(_SWAP_ONLY, params).first()
        if swapped is None:
            return None
        newest, name = conn.execute(
            sa.select(sa.func.max(versions.c.version), lineages.c.name)
            .join_from(versions, lineages, versions.c.lineage_id == lineages.c.lineage_id)
            .where(versions.c.lineage_id == swapped.lineage_id)
            .group_by(lineages.c.name)
        ).one()
        return SimpleNamespace(
            lineage_id=swapped.lineage_id, algorithm=swapped.algorithm, newest=newest, name=name
        )

    def material(self, realm: str, key_id: str) -> bytearray:
        query = sa.select(
            versions.c.key_id,
            versions.c.material,
            versions.c.lineage_id,
            versions.c.version,
            versions.c.algorithm,
            versions.c.state,
        ).where(versions.c.key_id == key_id, versions.c.realm == realm)
        with translate_errors(), self._reads.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFoundError(f"no key {key_id!r}")
        if row.state == KeyState.DESTROYED.value:
            raise destroyed_error(self.get(realm, key_id))
        return self._unwrap(realm, row)

    def _bump_marker(
        self, conn: sa.Connection, realm: str, lineage_id: str, *, kind: str = LINEAGE
    ) -> None:
        """Change the rotation marker and, on PostgreSQL, notify every server's change feed
        that ``lineage_id`` changed (both take effect when ``conn``'s transaction commits;
        the marker row's lock orders concurrent changes, so notices arrive in marker order)."""
        marker = new_id()
        change = Change(kind, realm, lineage_id, marker)
        if conn.dialect.name == "postgresql":  # both in one statement (one round trip)
            conn.execute(
                _BUMP_AND_NOTIFY, {"marker": marker, "name": STATE_MARKER} | notice(change)
            )
            return
        conn.execute(
            sa.update(meta_table).where(meta_table.c.name == STATE_MARKER).values(value=marker)
        )
        notify(conn, change)

    def _lineage_row(self, conn: sa.Connection, realm: str, lineage_id: str) -> Any:
        row = conn.execute(
            sa.select(lineages).where(
                lineages.c.lineage_id == lineage_id, lineages.c.realm == realm
            )
        ).first()
        if row is None:
            raise NotFoundError(f"no key {lineage_id!r}")
        return row

    def policy(self, realm: str, lineage_id: str) -> LineagePolicy:
        with translate_errors(), self._reads.connect() as conn:
            return to_policy(self._lineage_row(conn, realm, lineage_id))

    def _unwrap(self, realm: str, row: Any) -> bytearray:
        """The material of a row holding ``key_id``, ``lineage_id``, ``version``,
        ``algorithm`` and ``material``."""
        return self._wrapper.unwrap(
            row.material,
            wrap_context(realm, row.lineage_id, row.key_id, row.version, row.algorithm),
        )

    def set_policy(self, realm: str, lineage_id: str, policy: LineagePolicy) -> LineagePolicy:
        with translate_errors(), self.engine.begin() as conn:
            updated = conn.execute(
                sa.update(lineages)
                .where(lineages.c.lineage_id == lineage_id, lineages.c.realm == realm)
                .values(**policy_values(policy))
            ).rowcount
            if updated != 1:
                raise NotFoundError(f"no key {lineage_id!r}")
            self._bump_marker(conn, realm, lineage_id)
        return policy

    def set_state(self, realm: str, key_id: str, state: KeyState) -> KeyVersion:
        with translate_errors(), self.engine.begin() as conn:
            current = self._get(conn, realm, key_id)
            check_transition(current, state)
            if current.state is state:
                return current
            values: dict[str, Any] = {"state": state.value}
            if state is KeyState.DESTROYED:
                values["material"] = b""  # the wrapped material is gone from the row
            changed = conn.execute(
                sa.update(versions)
                .where(versions.c.key_id == key_id, versions.c.state == current.state.value)
                .values(**values)
            ).rowcount
            if changed != 1:
                raise ConflictError(
                    f"key {key_id} changed state concurrently; retry", code="conflict"
                )
            self._bump_marker(conn, realm, current.lineage_id)
        return replace(current, state=state)

    def delete_lineage(self, realm: str, lineage_id: str) -> None:
        with translate_errors(), self.engine.begin() as conn:
            self._lineage_row(conn, realm, lineage_id)
            conn.execute(
                sa.update(versions)
                .where(versions.c.lineage_id == lineage_id)
                .values(material=b"", state=KeyState.DESTROYED.value)
            )
            conn.execute(sa.delete(versions).where(versions.c.lineage_id == lineage_id))
            conn.execute(sa.delete(lineages).where(lineages.c.lineage_id == lineage_id))
            self._bump_marker(conn, realm, lineage_id)

    def restore_lineage(self, record: LineageRecord) -> None:
        try:
            with translate_errors(), self.engine.begin() as conn:
                conn.execute(
                    sa.insert(lineages).values(
                        lineage_id=record.lineage_id,
                        realm=record.realm,
                        name=record.name,
                        algorithm=record.algorithm,
                        created_at=record.created_at,
                        **policy_values(record.policy),
                    )
                )
                for item in record.versions:
                    version = record.key_version(item)
                    self._insert_version(conn, version, item.material or b"")
                    if item.material is None:
                        conn.execute(
                            sa.update(versions)
                            .where(versions.c.key_id == item.key_id)
                            .values(material=b"")
                        )
                    conn.execute(
                        sa.update(versions)
                        .where(versions.c.key_id == item.key_id)
                        .values(encryptions=item.encryptions)
                    )
                self._bump_marker(conn, record.realm, record.lineage_id)
        except IntegrityError:
            taken = record.name is not None and self._name_taken(record.realm, record.name)
            if taken:
                raise ConflictError(
                    f"a key named {record.name!r} already exists", code="name_taken"
                ) from None
            raise ConflictError(
                f"key {record.lineage_id} (or one of its versions) already exists",
                code="key_exists",
            ) from None

    def _name_taken(self, realm: str, name: str) -> bool:
        query = sa.select(lineages.c.lineage_id).where(
            lineages.c.realm == realm, lineages.c.name == name
        )
        with translate_errors(), self._reads.connect() as conn:
            return conn.execute(query).first() is not None

    def lineages(self) -> builtins.list[tuple[str, str]]:
        query = sa.select(lineages.c.realm, lineages.c.lineage_id).order_by(
            lineages.c.created_at, lineages.c.lineage_id
        )
        with translate_errors(), self._reads.connect() as conn:
            return [(row.realm, row.lineage_id) for row in conn.execute(query)]

    def ping(self) -> None:
        with translate_errors(), self._reads.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"<SqlKeyStore {self.engine.url.render_as_string(hide_password=True)}>"
