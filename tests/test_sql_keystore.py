"""The SQL key store's security properties on real SQLite files and real PostgreSQL.

A dump of the database holds no key material in any encoding; a wrong root key is refused;
a wrapped key copied onto another row does not unwrap; an unreachable database is a clean
StoreUnavailableError; nothing prints a password.
"""

from __future__ import annotations

import base64
import shutil
import socket
import sqlite3
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from qimem.backend import Backend
from qimem.builtin_plugins.sql.sqlite import SqliteKeyStore
from qimem.builtin_plugins.sql_keystore import SqlKeyStore
from qimem.errors import ConfigError, DecryptionError, StoreUnavailableError
from qimem.keystore import KeyStore
from qimem.registry import Registry, make_plugin_manager
from qimem.rootkey import KeyWrapper, generate_root_key

REALMS = ("master", "tenant-b")


def open_store(url: str, root_key: bytes | bytearray) -> KeyStore:
    """A store built the way qimem builds it: the registry's factory for the URL scheme."""
    scheme = url.split(":", 1)[0]
    factory = Registry(make_plugin_manager()).keystores[scheme]
    return Backend.of(factory(url, KeyWrapper(root_key)), scheme).keys


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def root_key() -> bytearray:
    return generate_root_key()


def populate(store: KeyStore) -> list[bytes]:
    """Create keys in two realms, rotate some; the raw material of every version."""
    for realm in REALMS:
        a = store.create(realm, "aes-256-gcm", generate_root_key(), name="alpha")
        store.create(realm, "chacha20-poly1305", generate_root_key())
        a2 = store.rotate(realm, a.key_id, generate_root_key())
        store.rotate(realm, a2.key_id, generate_root_key())
    secrets = []
    for realm in REALMS:
        for newest in store.list(realm):
            for version in store.versions(realm, newest.lineage_id):
                secrets.append(bytes(store.material(realm, version.key_id)))
    assert len(secrets) == 8 and len(set(secrets)) == 8
    return secrets


def encodings(secret: bytes) -> list[bytes]:
    """Every form a key could take in a dump: raw, hex (both cases), base64 (both alphabets)."""
    forms = [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret),
        base64.urlsafe_b64encode(secret),
    ]
    return forms + [form.rstrip(b"=") for form in forms[3:]]


def leaked(dump: bytes, secrets: list[bytes]) -> list[str]:
    """Which secrets (by index and form) appear anywhere in ``dump``."""
    return [
        f"secret {i} form {j}"
        for i, secret in enumerate(secrets)
        for j, form in enumerate(encodings(secret))
        if form in dump
    ]


def test_leak_search_finds_planted_material() -> None:
    """The search itself works: planting a key in any form is found."""
    secrets = [bytes(generate_root_key()) for _ in range(2)]
    for form in encodings(secrets[1]):
        assert leaked(b"x" * 100 + form + b"y" * 100, secrets) != []
    assert leaked(b"nothing here", secrets) == []


def test_sqlite_file_dump_holds_no_key_material(tmp_path: Path, root_key: bytearray) -> None:
    db = tmp_path / "keys.db"
    store = open_store(f"sqlite:///{db}", root_key)
    secrets = populate(store) + [bytes(root_key)]
    files = sorted(tmp_path.glob("keys.db*"))
    assert db in files
    while_open = b"".join(f.read_bytes() for f in files)  # includes the WAL
    store.close()
    after_close = b"".join(f.read_bytes() for f in sorted(tmp_path.glob("keys.db*")))
    with sqlite3.connect(db) as conn:
        text_dump = "\n".join(conn.iterdump()).encode()
        rows = conn.execute("SELECT * FROM qimem_key_versions").fetchall()
    conn.close()
    assert len(rows) == 8
    assert b"INSERT INTO" in text_dump and b"qimem_key_versions" in text_dump
    for name, dump in [("open", while_open), ("closed", after_close), ("iterdump", text_dump)]:
        assert leaked(dump, secrets) == [], name
    # The material column holds the wrapped form: longer than the key and all different.
    wrapped = [row[6] for row in rows]
    assert all(isinstance(w, bytes) and len(w) > 32 for w in wrapped)
    assert len(set(wrapped)) == len(wrapped)


@pytest.mark.postgres
def test_postgres_dump_holds_no_key_material(postgres_url: str, root_key: bytearray) -> None:
    store = open_store(postgres_url, root_key)
    secrets = populate(store) + [bytes(root_key)]
    store.close()
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text("SELECT * FROM qimem_key_versions"))
            columns = list(result.keys())
            rows = result.all()
            raw = conn.connection.driver_connection
            assert raw is not None
            copied = b""
            for table in ("qimem_key_versions", "qimem_lineages", "qimem_meta"):
                with raw.cursor() as cursor, cursor.copy(f"COPY {table} TO STDOUT") as copy:
                    copied += b"".join(bytes(chunk) for chunk in copy)
    finally:
        engine.dispose()
    assert "material" in columns and len(rows) == 8
    cells = b""
    for row in rows:
        for value in row:
            if isinstance(value, bytes | memoryview):
                cells += bytes(value) + bytes(value).hex().encode()
            else:
                cells += str(value).encode()
    assert leaked(cells, secrets) == []
    assert leaked(copied, secrets) == []
    assert b"\\\\x" in copied  # the bytea column is in the COPY text (hex-escaped)
    pg_dump = shutil.which("pg_dump")
    if pg_dump:  # the dump an operator would take, when the client tools are installed
        url = sa.engine.make_url(postgres_url)
        full = subprocess.run(
            [pg_dump, "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)]
            + ["-U", url.username or "postgres", url.database or ""],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        assert b"qimem_key_versions" in full
        assert leaked(full, secrets) == []


def test_wrong_root_key_is_refused(sql_url: str, root_key: bytearray) -> None:
    store = open_store(sql_url, root_key)
    key = store.create("master", "aes-256-gcm", generate_root_key())
    store.close()
    with pytest.raises(ConfigError, match="root key") as info:
        open_store(sql_url, generate_root_key())
    assert info.value.exit_code == ConfigError.exit_code
    # The right root key still opens it, and the key is intact.
    store = open_store(sql_url, root_key)
    try:
        assert store.get("master", key.key_id) == key
        assert len(store.material("master", key.key_id)) == 32
    finally:
        store.close()


def _copy_material(store: SqlKeyStore, source: str, target: str) -> None:
    versions = sa.table("qimem_key_versions", sa.column("key_id"), sa.column("material"))
    with store.engine.begin() as conn:
        blob = conn.execute(
            sa.select(versions.c.material).where(versions.c.key_id == source)
        ).scalar_one()
        conn.execute(sa.update(versions).where(versions.c.key_id == target).values(material=blob))


def test_row_swap_does_not_unwrap(sql_url: str, root_key: bytearray) -> None:
    store = open_store(sql_url, root_key)
    assert isinstance(store, SqlKeyStore | SqliteKeyStore)  # SQLite: the sqlite3 hot path
    try:
        v1 = store.create("master", "aes-256-gcm", generate_root_key(), name="victim")
        v2 = store.rotate("master", v1.key_id, generate_root_key())
        other = store.create("tenant-b", "aes-256-gcm", generate_root_key(), name="victim")
        expected_v1 = store.material("master", v1.key_id)

        _copy_material(store, v1.key_id, v2.key_id)  # same lineage, other version
        with pytest.raises(DecryptionError):
            store.material("master", v2.key_id)
        _copy_material(store, v1.key_id, other.key_id)  # same name, other realm
        with pytest.raises(DecryptionError) as info:
            store.material("tenant-b", other.key_id)
        assert info.value.code == "decryption_failed"
        # The row that was copied from still unwraps to its own key.
        assert store.material("master", v1.key_id) == expected_v1
    finally:
        store.close()


def test_damaged_wrapped_material(tmp_path: Path, root_key: bytearray) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'keys.db'}", root_key)
    assert isinstance(store, SqlKeyStore | SqliteKeyStore)  # SQLite: the sqlite3 hot path
    try:
        key = store.create("master", "aes-256-gcm", generate_root_key())
        versions = sa.table("qimem_key_versions", sa.column("key_id"), sa.column("material"))
        with store.engine.begin() as conn:
            blob = conn.execute(sa.select(versions.c.material)).scalar_one()
        for damaged in (blob[:-1] + bytes([blob[-1] ^ 1]), blob[:20], b"", b"\x02" + blob[1:]):
            with store.engine.begin() as conn:
                conn.execute(sa.update(versions).values(material=damaged))
            with pytest.raises(DecryptionError):
                store.material("master", key.key_id)
    finally:
        store.close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("scheme", ["postgresql+psycopg", "postgresql", "postgres"])
def test_unreachable_store(scheme: str, root_key: bytearray) -> None:
    password = "Sup3rSecretPassw0rd"
    url = f"{scheme}://qimem:{password}@127.0.0.1:{_closed_port()}/qimem"
    with pytest.raises(StoreUnavailableError) as info:
        open_store(url, root_key)
    error = info.value
    assert error.code == "store_unavailable" and error.http_status == 503
    rendered = "".join(traceback.format_exception(error))
    for text in (str(error), repr(error), rendered, str(error.to_dict())):
        assert password not in text


@pytest.mark.postgres
def test_repr_hides_password(postgres_url: str, root_key: bytearray) -> None:
    password = "Sup3rSecretPassw0rd"  # trust auth accepts (and ignores) it
    url = sa.engine.make_url(postgres_url).set(password=password)
    store = open_store(url.render_as_string(hide_password=False), root_key)
    try:
        store.create("master", "aes-256-gcm", generate_root_key())
        assert isinstance(store, SqlKeyStore | SqliteKeyStore)  # SQLite: the sqlite3 hot path
        for text in (repr(store), str(store), repr(store.engine)):
            assert password not in text
        assert "***" in repr(store)
        wrapper = KeyWrapper(root_key)
        assert bytes(root_key).hex() not in repr(wrapper)
        assert base64.b64encode(bytes(root_key)).decode() not in repr(wrapper)
    finally:
        store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path, root_key: bytearray) -> Iterator[KeyStore]:
    store = open_store(f"sqlite:///{tmp_path / 'keys.db'}", root_key)
    yield store
    store.close()


def test_sqlite_uses_wal(sqlite_store: KeyStore) -> None:
    assert isinstance(sqlite_store, SqlKeyStore | SqliteKeyStore)
    with sqlite_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_unique_version_constraint(sqlite_store: KeyStore) -> None:
    """The (lineage, version) constraint is the backstop behind the compare-and-swap."""
    assert isinstance(sqlite_store, SqlKeyStore | SqliteKeyStore)
    key = sqlite_store.create("master", "aes-256-gcm", generate_root_key())
    with pytest.raises(sa.exc.IntegrityError), sqlite_store.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO qimem_key_versions (key_id, lineage_id, realm, version, algorithm,"
            " state, material, created_at) SELECT 'dup', lineage_id, realm, version,"
            " algorithm, state, material, created_at FROM qimem_key_versions WHERE key_id = ?",
            (key.key_id,),
        )


def test_sqlite_hot_path_connections_use_wal_and_full_sync(sqlite_store: KeyStore) -> None:
    """The sqlite3 connections of the hot path (not only SQLAlchemy's) run in WAL mode,
    with synchronous=FULL and foreign keys enforced."""
    assert isinstance(sqlite_store, SqliteKeyStore)
    conn = sqlite_store._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
