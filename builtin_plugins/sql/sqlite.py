"""``sqlite:///path``: the embedded store, its hot path on the standard library's ``sqlite3``.

What a CLI process does with the embedded store — resolve a key, unwrap its material,
reserve (and give back) usage counts, list keys, read a policy — runs here on ``sqlite3``
(imported with Python; SQLAlchemy costs ~100 ms of start-up). Opening checks the schema by
reading ``alembic_version``; only a database that is behind (or new) goes through
SQLAlchemy and Alembic to migrate. Everything that writes key versions or policies
(create, rotate, state changes, deletion, restore) and the identity layer (``engine``)
are handed to :class:`qimem.builtin_plugins.sql.store.SqlKeyStore` over the same file,
built on first use: one schema, one set of migrations, one implementation of each write.

Both run on one database, in WAL mode with ``synchronous=FULL``; the same 0600 checks
apply (:mod:`qimem.sqlite_files`), and SQLite's errors become the same
:class:`~qimem.errors.StoreUnavailableError` (naming a full disk) as on SQLAlchemy.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.builtin_plugins.sql.migrations import HEAD
from qimem.errors import ConfigError, NotFoundError, StoreUnavailableError
from qimem.keys import KeyState, KeyVersion, LineagePolicy, LineageRecord, new_id
from qimem.keystore import KeyStore, destroyed_error
from qimem.sqlite_files import (
    SQLITE_TIMEOUT,
    check_sqlite_permissions,
    enable_wal,
    prepare_sqlite_file,
    space_detail,
)

if TYPE_CHECKING:
    from qimem.builtin_plugins.sql.store import SqlKeyStore
    from qimem.rootkey import KeyWrapper

#: ``sqlite:///relative/path`` or ``sqlite:////absolute/path``; anything else (a query
#: string, percent-escapes, ``:memory:``) is left to SQLAlchemy's URL parser.
_PLAIN_URL = re.compile(r"^sqlite:///([^?#%]+)$")
_STATE_MARKER = "key_state_marker"
_VERSION_COLUMNS = (
    "v.key_id, v.lineage_id, l.name, v.realm, v.version, v.algorithm, v.state, v.created_at"
)
_SELECT_VERSIONS = (  # constant text: every value is a ? parameter
    f"SELECT {_VERSION_COLUMNS} FROM qimem_key_versions v "  # noqa: S608 (constant columns)
    "JOIN qimem_lineages l ON v.lineage_id = l.lineage_id"
)


def open_store(url: str, wrapper: KeyWrapper) -> SqlKeyStore | SqliteKeyStore:
    """The key store factory of the ``sqlite`` scheme (see the module docstring)."""
    match = _PLAIN_URL.match(url)
    if match is None or match.group(1) == ":memory:":
        from qimem.builtin_plugins.sql.store import SqlKeyStore

        return SqlKeyStore(url, wrapper)
    return SqliteKeyStore(url, Path(match.group(1)), wrapper)


def _utc(value: str | None) -> datetime | None:
    """A DateTime column as SQLAlchemy stores it on SQLite (ISO text, offset dropped)."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


def _to_version(row: tuple[Any, ...]) -> KeyVersion:
    created = _utc(row[7])
    assert created is not None
    return KeyVersion(
        key_id=row[0],
        lineage_id=row[1],
        name=row[2],
        realm=row[3],
        version=row[4],
        algorithm=row[5],
        state=KeyState(row[6]),
        created_at=created,
    )


class SqliteKeyStore(KeyStore):
    """An SQLite key store whose reads and usage counters use ``sqlite3`` directly."""

    def __init__(self, url: str, database: Path, wrapper: KeyWrapper) -> None:
        if wrapper is None:
            raise ConfigError("an SQL key store needs a root key (run 'qimem init')")
        self.url = url
        self.database = database
        self._wrapper = wrapper
        self._local = threading.local()
        self._pid = os.getpid()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._sql: SqlKeyStore | None = None
        prepare_sqlite_file(database)  # a new file is created 0600
        check_sqlite_permissions(database)  # an existing one others can read is refused
        if self._revision() != HEAD:
            self._full()  # SQLAlchemy + Alembic migrate, check the root key, add the marker
            return
        meta = dict(
            self._query(
                "SELECT name, value FROM qimem_meta WHERE name IN ('root_key_check', ?) "
                "UNION ALL SELECT 'root_keyring', document FROM qimem_root_keyring WHERE id = 1",
                (_STATE_MARKER,),
            )
        )
        from qimem.builtin_plugins.sql.root_slot import SqliteRootSlot

        wrapper.attach(
            SqliteRootSlot(self._query, self._write),
            meta.get("root_keyring"),
            fresh=meta.get("root_key_check") is None,
        )
        stored = meta.get("root_key_check")
        if stored is None or _STATE_MARKER not in meta:  # a new store: one write, once
            stored = self._init_meta()
        if stored != wrapper.check_value:
            raise ConfigError(
                "the root key does not match this store (wrong root key file or QIMEM_ROOT_KEY)"
            )

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (autocommit: each statement its own transaction,
        writes in explicit ``BEGIN IMMEDIATE`` blocks). A forked child opens its own."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._local = threading.local()
            self._connections = []
            self._lock = threading.Lock()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            with self._errors():
                conn = sqlite3.connect(
                    self.database,
                    timeout=SQLITE_TIMEOUT,
                    isolation_level=None,
                    check_same_thread=False,
                )
                cursor = conn.cursor()
                enable_wal(cursor)
                cursor.execute("PRAGMA synchronous=FULL")  # a key must survive a power cut
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """SQLite's errors as the SQLAlchemy store reports them (:func:`qimem.sql.
        translate_errors`): "the key store is unavailable (...)", naming a full disk."""
        try:
            yield
        except (sqlite3.OperationalError, sqlite3.DatabaseError) as exc:
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError):
                raise
            detail = space_detail(exc, self.database)
            raise StoreUnavailableError(f"the key store is unavailable ({detail})") from None

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._errors():
            return self._conn().execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, its lock taken before anything is read."""
        conn = self._conn()
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _revision(self) -> str | None:
        try:
            rows = self._conn().execute("SELECT version_num FROM alembic_version").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            detail = space_detail(exc, self.database)
            raise StoreUnavailableError(f"the key store is unavailable ({detail})") from None
        return rows[0][0] if rows else None

    def _full(self) -> SqlKeyStore:
        """The SQLAlchemy store over the same file, for writes and administration."""
        with self._lock:
            if self._sql is None:
                from qimem.builtin_plugins.sql.store import SqlKeyStore

                self._sql = SqlKeyStore(self.url, self._wrapper)
            return self._sql

    def root_wrapped_columns(self) -> list[Any]:
        """The columns root rotation moves (the SQLAlchemy store's)."""
        return self._full().root_wrapped_columns()

    @property
    def engine(self) -> Any:
        """The SQLAlchemy engine (identity layer, plugin catalog): built on first use."""
        return self._full().engine

    def _init_meta(self) -> str:
        """Record the root key's check value (on first use) and the rotation marker; return
        the stored check value (another process's, if it recorded one first)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO qimem_meta (name, value) VALUES ('root_key_check', ?)",
                (self._wrapper.check_value,),
            )
            conn.execute(
                "INSERT OR IGNORE INTO qimem_meta (name, value) VALUES (?, ?)",
                (_STATE_MARKER, new_id()),
            )
            row = conn.execute(
                "SELECT value FROM qimem_meta WHERE name = 'root_key_check'"
            ).fetchone()
        return str(row[0])

    # -- the hot path ------------------------------------------------------------------

    def rotation_marker(self) -> object:
        rows = self._query("SELECT value FROM qimem_meta WHERE name = ?", (_STATE_MARKER,))
        return rows[0][0] if rows else None

    def get(self, realm: str, key_id: str) -> KeyVersion:
        rows = self._query(
            f"{_SELECT_VERSIONS} WHERE v.key_id = ? AND v.realm = ?", (key_id, realm)
        )
        if not rows:
            raise NotFoundError(f"no key {key_id!r}")
        return _to_version(rows[0])

    def find_lineage(self, realm: str, ref: str) -> str:
        rows = self._query(
            "SELECT lineage_id FROM qimem_lineages "
            "WHERE realm = ? AND (name = ? OR lineage_id = ?)",
            (realm, ref, ref),
        )
        if not rows:
            raise NotFoundError(f"no key {ref!r}")
        return str(rows[0][0])

    def versions(self, realm: str, lineage_id: str) -> list[KeyVersion]:
        rows = self._query(
            f"{_SELECT_VERSIONS} WHERE v.lineage_id = ? AND v.realm = ? ORDER BY v.version",
            (lineage_id, realm),
        )
        if not rows:
            raise NotFoundError(f"no key {lineage_id!r}")
        return [_to_version(row) for row in rows]

    def active_version(self, realm: str, lineage_id: str) -> KeyVersion:
        """The newest active version, read alone (a lineage may hold thousands)."""
        rows = self._query(
            f"{_SELECT_VERSIONS} WHERE v.lineage_id = ? AND v.realm = ? AND v.state = ? "
            "ORDER BY v.version DESC LIMIT 1",
            (lineage_id, realm, KeyState.ACTIVE.value),
        )
        if not rows:
            return super().active_version(realm, lineage_id)  # NotFound or not active
        return _to_version(rows[0])

    def list(self, realm: str) -> list[KeyVersion]:
        rows = self._query(
            f"{_SELECT_VERSIONS} JOIN (SELECT lineage_id, max(version) AS newest "  # noqa: S608 (constant)
            "FROM qimem_key_versions WHERE realm = ? GROUP BY lineage_id) n "
            "ON v.lineage_id = n.lineage_id AND v.version = n.newest "
            "WHERE v.realm = ? ORDER BY l.created_at, l.lineage_id",
            (realm, realm),
        )
        return [_to_version(row) for row in rows]

    def material(self, realm: str, key_id: str) -> bytearray:
        rows = self._query(
            "SELECT material, lineage_id, version, algorithm, state FROM qimem_key_versions "
            "WHERE key_id = ? AND realm = ?",
            (key_id, realm),
        )
        if not rows:
            raise NotFoundError(f"no key {key_id!r}")
        material, lineage_id, version, algorithm, state = rows[0]
        if state == KeyState.DESTROYED.value:
            raise destroyed_error(self.get(realm, key_id))
        context = f"qimem-key-v1|{realm}|{lineage_id}|{key_id}|{version}|{algorithm}".encode()
        return self._wrapper.unwrap(bytes(material), context)

    def policy(self, realm: str, lineage_id: str) -> LineagePolicy:
        rows = self._query(
            "SELECT min_decryption_version, min_encryption_version, usage_limit, "
            "auto_rotate_seconds, deletion_protection, deletion_date, derived, "
            "vault_layout_versions "
            "FROM qimem_lineages WHERE lineage_id = ? AND realm = ?",
            (lineage_id, realm),
        )
        if not rows:
            raise NotFoundError(f"no key {lineage_id!r}")
        row = rows[0]
        return LineagePolicy(
            min_decryption_version=row[0],
            min_encryption_version=row[1],
            usage_limit=row[2],
            auto_rotate_seconds=row[3],
            deletion_protection=bool(row[4]),
            deletion_date=_utc(row[5]),
            derived=bool(row[6]),
            vault_layout_versions=row[7],
        )

    def reserve_usage(self, realm: str, key_id: str, count: int, limit: int) -> int:
        with self._write() as conn:  # the write lock first: reservations serialize
            row = conn.execute(
                "SELECT encryptions FROM qimem_key_versions WHERE key_id = ? AND realm = ?",
                (key_id, realm),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no key {key_id!r}")
            granted = max(0, min(count, limit - int(row[0])))
            if granted:
                conn.execute(
                    "UPDATE qimem_key_versions SET encryptions = encryptions + ? WHERE key_id = ?",
                    (granted, key_id),
                )
        return granted

    def release_usage(self, realm: str, key_id: str, count: int) -> None:
        if count <= 0:
            return
        with self._write() as conn:
            conn.execute(
                "UPDATE qimem_key_versions SET encryptions = max(encryptions - ?, 0) "
                "WHERE key_id = ? AND realm = ?",
                (count, key_id, realm),
            )

    def usage(self, realm: str, lineage_id: str) -> dict[str, int]:
        rows = self._query(
            "SELECT key_id, encryptions FROM qimem_key_versions WHERE lineage_id = ? AND realm = ?",
            (lineage_id, realm),
        )
        if not rows:
            raise NotFoundError(f"no key {lineage_id!r}")
        return {key_id: int(count) for key_id, count in rows}

    def lineages(self) -> builtins.list[tuple[str, str]]:
        rows = self._query(
            "SELECT realm, lineage_id FROM qimem_lineages ORDER BY created_at, lineage_id"
        )
        return [(realm, lineage_id) for realm, lineage_id in rows]

    def ping(self) -> None:
        self._query("SELECT 1")

    # -- writes and administration: the SQLAlchemy store -------------------------------

    def create(
        self, realm: str, algorithm: str, material: bytes | bytearray, *, name: str | None = None
    ) -> KeyVersion:
        return self._full().create(realm, algorithm, material, name=name)

    def rotate(self, realm: str, key_id: str, material: bytes | bytearray) -> KeyVersion:
        return self._full().rotate(realm, key_id, material)

    def set_policy(self, realm: str, lineage_id: str, policy: LineagePolicy) -> LineagePolicy:
        return self._full().set_policy(realm, lineage_id, policy)

    def set_state(self, realm: str, key_id: str, state: KeyState) -> KeyVersion:
        return self._full().set_state(realm, key_id, state)

    def delete_lineage(self, realm: str, lineage_id: str) -> None:
        self._full().delete_lineage(realm, lineage_id)

    def restore_lineage(self, record: LineageRecord) -> None:
        self._full().restore_lineage(record)

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
            sql, self._sql = self._sql, None
        if self._pid == os.getpid():  # never close a parent's connections in a fork
            for conn in connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._local = threading.local()
        if sql is not None:
            sql.close()

    def __repr__(self) -> str:
        return f"<SqliteKeyStore sqlite:///{self.database}>"
