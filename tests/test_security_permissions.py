"""Finding 4: the SQLite store was readable by every local user.

``qimem.db`` and its ``-wal`` and ``-shm`` files hold password hashes, the audit log and the
wrapped keys. Under the usual umask 022 SQLite created them 0644. The attacker is another
local user reading them. Every test here sets umask 022 explicitly and drives the real CLI
(separate processes) or ``qimem serve``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_process import ServeProcess, home_env, qimem_process

from qimem.errors import ConfigError

STORE_FILES = ("qimem.db", "qimem.db-wal", "qimem.db-shm")


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def held_open(db: Path) -> sqlite3.Connection:
    """A reader that keeps the database open, so the ``-wal``/``-shm`` files a qimem process
    writes outlive it (SQLite deletes them when the last connection closes)."""
    reader = sqlite3.connect(db)
    reader.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return reader


def test_finding4_cli_creates_store_files_0600_and_directory_0700(tmp_path: Path) -> None:
    home = tmp_path / "new" / "home"  # qimem creates both directories
    done = qimem_process(home, "init")
    assert done.returncode == 0, done.stderr
    assert mode(home) == 0o700 and mode(home.parent) == 0o700
    assert mode(home / "qimem.db") == 0o600
    assert mode(home / "root.key") == 0o600 and mode(home / "config.toml") == 0o600
    reader = held_open(home / "qimem.db")
    try:
        for i in range(3):  # writes that go to the write-ahead log
            done = qimem_process(home, "keys", "create", "--name", f"k{i}")
            assert done.returncode == 0, done.stderr
        assert (home / "qimem.db-wal").stat().st_size > 0
        for name in STORE_FILES:
            assert mode(home / name) == 0o600, name
        assert not any(p.stat().st_mode & 0o077 for p in home.iterdir() if p.is_file())
    finally:
        reader.close()


def test_finding4_serve_store_files_are_0600(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert qimem_process(home, "init").returncode == 0
    env = home_env(home)
    server = ServeProcess(tmp_path, env)
    try:
        server.wait_ready()
        request = urllib.request.Request(
            f"{server.url}/v1/security/keys",
            data=json.dumps({"name": "served"}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 201
        assert (home / "qimem.db-wal").stat().st_size > 0  # the server holds it open
        for name in STORE_FILES:
            assert mode(home / name) == 0o600, name
    finally:
        assert server.stop() == 0


def test_finding4_serve_refuses_a_store_others_can_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert qimem_process(home, "init").returncode == 0
    (home / "qimem.db").chmod(0o644)
    env = home_env(home)
    server = ServeProcess(tmp_path, env)
    try:
        assert server.proc.wait(60) == ConfigError.exit_code
    finally:
        server.kill()
    log = server.log()
    assert f"{home / 'qimem.db'} (mode 0644)" in log and "Traceback" not in log


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604, 0o660])
def test_finding4_cli_refuses_a_store_others_can_access_and_init_fixes_it(
    tmp_path: Path, loose: int
) -> None:
    home = tmp_path / "home"
    assert qimem_process(home, "init").returncode == 0
    db = home / "qimem.db"
    reader = held_open(db)  # leaves -wal and -shm behind to be fixed as well
    try:
        assert qimem_process(home, "keys", "create", "--name", "k").returncode == 0
        for name in STORE_FILES:
            (home / name).chmod(loose)
        refused = qimem_process(home, "keys", "list")
        assert refused.returncode == ConfigError.exit_code == 9
        for name in STORE_FILES:  # like the root key: each file, its mode and the fix
            assert f"{home / name} (mode {loose:04o})" in refused.stderr
        assert "qimem init" in refused.stderr and "chmod 600" in refused.stderr
        assert "Traceback" not in refused.stderr
        fixed = qimem_process(home, "init", "--json")
        assert fixed.returncode == 0, fixed.stderr
        report = json.loads(fixed.stdout)["fixed_permissions"]
        assert {(r["path"], r["old_mode"], r["mode"]) for r in report} == {
            (str(home / name), f"{loose:04o}", "0600") for name in STORE_FILES
        }
        for name in STORE_FILES:
            assert mode(home / name) == 0o600
        assert qimem_process(home, "keys", "list").returncode == 0
        again = qimem_process(home, "init")
        assert again.returncode == 0 and "fixed permissions" not in again.stdout
    finally:
        reader.close()


def test_finding4_init_says_which_files_it_fixed(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert qimem_process(home, "init").returncode == 0
    (home / "qimem.db").chmod(0o644)
    done = qimem_process(home, "init")
    assert done.returncode == 0, done.stderr
    assert f"fixed permissions of {home / 'qimem.db'}: 0644 -> 0600" in done.stdout


@pytest.mark.parametrize("db_mode", [0o600, 0o640, 0o644])
def test_finding4_sqlite_gives_wal_and_shm_the_database_files_mode(
    tmp_path: Path, db_mode: int
) -> None:
    """The claim the fix rests on: SQLite creates ``-wal`` and ``-shm`` with the mode of the
    database file (not from the umask), so a 0600 database keeps them 0600."""
    db = tmp_path / "x.db"
    fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, db_mode)
    os.fchmod(fd, db_mode)
    os.close(fd)
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        assert mode(tmp_path / "x.db-wal") == db_mode
        assert mode(tmp_path / "x.db-shm") == db_mode
    finally:
        conn.close()
