"""Alembic migrations of the SQL store on real SQLite files and real PostgreSQL databases."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from qimem.builtin_plugins.sql.migrations import HEAD
from qimem.builtin_plugins.sql_keystore import SqlKeyStore
from qimem.errors import ConfigError
from qimem.keys import KeyState
from qimem.rootkey import KeyWrapper, decode_root_key, generate_root_key
from qimem.sql import create_engine, current_revision, migrate, sqlite_foreign_keys
from qimem.testing import run_concurrently

KEY_TABLES = {"qimem_meta", "qimem_lineages", "qimem_key_versions", "alembic_version"}


def alembic_config(connection: sa.Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "qimem.builtin_plugins.sql:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_head_is_the_alembic_head() -> None:
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [HEAD]  # one head, no branches
    assert script.get_current_head() == HEAD
    # Every revision chains back to the first one.
    revisions = list(script.walk_revisions())
    assert revisions[0].revision == HEAD
    assert revisions[-1].down_revision is None


def test_fresh_database_migrates_to_head(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn) is None
            assert sa.inspect(conn).get_table_names() == []
        assert migrate(engine) is True
        with engine.connect() as conn:
            assert current_revision(conn) == HEAD
            assert set(sa.inspect(conn).get_table_names()) >= KEY_TABLES
        assert migrate(engine) is False  # idempotent
        assert migrate(engine) is False
        with engine.connect() as conn:
            assert current_revision(conn) == HEAD
            assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1
    finally:
        engine.dispose()


def test_keys_survive_reopening(db_url: str) -> None:
    root_key = generate_root_key()
    store = SqlKeyStore(db_url, KeyWrapper(root_key))
    v1 = store.create("master", "aes-256-gcm", generate_root_key(), name="durable")
    v2 = store.rotate("master", v1.key_id, generate_root_key())
    materials = {v.key_id: store.material("master", v.key_id) for v in (v1, v2)}
    store.close()

    reopened = SqlKeyStore(db_url, KeyWrapper(root_key))
    try:
        rotated_away = replace(v1, state=KeyState.DECRYPT_ONLY)
        assert reopened.get("master", v1.key_id) == rotated_away
        assert reopened.versions("master", v1.lineage_id) == [rotated_away, v2]
        assert reopened.find_lineage("master", "durable") == v1.lineage_id
        for key_id, material in materials.items():
            assert reopened.material("master", key_id) == material
        assert migrate(reopened.engine) is False
    finally:
        reopened.close()


def test_older_schema_is_upgraded_on_open(tmp_path: Path) -> None:
    """A database at the first revision is brought to HEAD when a store opens it."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0001")
        assert current_revision(conn) == "0001"
    engine.dispose()
    store = SqlKeyStore(url, KeyWrapper(generate_root_key()))
    try:
        with store.engine.connect() as conn:
            assert current_revision(conn) == HEAD
        key = store.create("master", "aes-256-gcm", generate_root_key())
        assert store.get("master", key.key_id) == key
    finally:
        store.close()


def _older_revisions() -> list[str]:
    script = ScriptDirectory.from_config(alembic_config())
    return [r.revision for r in script.walk_revisions() if r.revision != HEAD]


@pytest.mark.parametrize("revision", _older_revisions())
def test_populated_store_upgrades_from_every_older_revision(db_url: str, revision: str) -> None:
    """Keys written by a store survive a downgrade to ``revision`` and the upgrade back.

    Upgrades of populated databases are what users run; SQLite's batch migrations copy and
    drop tables that other tables reference, which fails with foreign keys enforced.
    """
    root_key = generate_root_key()
    store = SqlKeyStore(db_url, KeyWrapper(root_key))
    v1 = store.create("master", "aes-256-gcm", generate_root_key(), name="kept")
    v2 = store.rotate("master", v1.key_id, generate_root_key())
    materials = {v.key_id: store.material("master", v.key_id) for v in (v1, v2)}
    store.close()

    engine = create_engine(db_url)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            sqlite_foreign_keys(conn, False)  # outside a transaction (qimem.sql)
        with conn.begin():
            command.downgrade(alembic_config(conn), revision)
            assert current_revision(conn) == revision
    engine.dispose()

    reopened = SqlKeyStore(db_url, KeyWrapper(root_key))  # upgrades to HEAD
    try:
        with reopened.engine.connect() as conn:
            assert current_revision(conn) == HEAD
            if reopened.engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert [v.key_id for v in reopened.versions("master", v1.lineage_id)] == [
            v1.key_id,
            v2.key_id,
        ]
        for key_id, material in materials.items():
            assert reopened.material("master", key_id) == material
    finally:
        reopened.close()


def test_concurrent_migrations_in_threads(db_url: str) -> None:
    engines = [create_engine(db_url) for _ in range(4)]
    try:
        results = run_concurrently(len(engines), lambda i: migrate(engines[i]))
        assert sorted(results, key=str) == [False, False, False, True]
        with engines[0].connect() as conn:
            assert current_revision(conn) == HEAD
    finally:
        for engine in engines:
            engine.dispose()


_CHILD = textwrap.dedent(
    """
    import json, sys
    from qimem.builtin_plugins.sql_keystore import SqlKeyStore
    from qimem.rootkey import KeyWrapper, decode_root_key
    from qimem.sql import create_engine, migrate

    job = json.loads(sys.argv[1])
    wrapper = KeyWrapper(decode_root_key(job["root_key"], "test root key"))
    engines = [create_engine(url) for url in job["urls"]]
    print("ready", flush=True)
    sys.stdin.readline()
    results = [migrate(engine) for engine in engines]
    for url in job["urls"]:  # then all record/check the root key at about the same time
        SqlKeyStore(url, wrapper, auto_migrate=False).close()
    print(json.dumps(results), flush=True)
    """
)


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_migrations_in_processes(
    postgres_url: str, tmp_path: Path, root_key_b64: str
) -> None:
    """Four processes opening the same fresh databases at once: one migrates, none fails."""
    urls = [f"sqlite:///{tmp_path / 'race.db'}", postgres_url]
    job = json.dumps({"urls": urls, "root_key": root_key_b64})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, job],
            # Not the repo root: its qimem/ folder would shadow the installed package.
            cwd=tempfile.gettempdir(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready", proc.communicate()[1][-2000:]
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for index, url in enumerate(urls):
        assert sorted(r[index] for r in results) == [False, False, False, True], url
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                assert current_revision(conn) == HEAD
        finally:
            engine.dispose()
        # The root key the children recorded is the one the store now insists on.
        SqlKeyStore(url, KeyWrapper(decode_root_key(root_key_b64, "test"))).close()
        with pytest.raises(ConfigError, match="root key"):
            SqlKeyStore(url, KeyWrapper(generate_root_key()))
