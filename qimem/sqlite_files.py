"""The files of an SQLite store, and what its connections need, without SQLAlchemy.

Shared by the SQLAlchemy engine (:mod:`qimem.sql`) and the standard-library ``sqlite3``
hot path (:mod:`qimem.builtin_plugins.sql.sqlite`): both create a store 0600, refuse one
that group or others can read, switch it to WAL and name a full disk the same way.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

from qimem import fileio
from qimem.errors import ConfigError

SQLITE_TIMEOUT = 30.0

#: The files of an SQLite store: the database, its write-ahead log, its shared-memory index
#: and (outside WAL mode) its rollback journal.
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def prepare_sqlite_file(database: Path) -> None:
    """Create a missing store directory (0700) and database file (0600) before SQLite does.

    SQLite would create the database with mode 0644 less the umask (0644 under the usual
    umask 022), readable by every local user; it creates the ``-wal`` and ``-shm`` files
    with the database file's mode, so they are 0600 too. ``O_EXCL`` never opens an existing
    file or a planted symlink; an existing database is left to
    :func:`check_sqlite_permissions`.
    """
    try:
        fileio.make_private_dirs(database.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the store directory {database.parent}: {exc.strerror}"
        ) from None
    try:
        fd = os.open(database, fileio.CREATE_FLAGS, 0o600)
    except OSError:
        return  # it exists (checked on open), or SQLite reports why it cannot be created
    try:
        os.fchmod(fd, 0o600)  # exactly, whatever the umask
    finally:
        os.close(fd)


def _loose_files(database: Path) -> list[tuple[Path, int]]:
    loose = []
    for suffix in SQLITE_SUFFIXES:
        path = database.with_name(database.name + suffix)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            loose.append((path, mode))
    return loose


def check_sqlite_permissions(database: Path) -> None:
    """Refuse a store whose files group or others can access, as the root key file is
    refused: they hold password hashes, the audit log and the wrapped keys.

    :raises ConfigError: naming each file, its mode and the fix.
    """
    loose = _loose_files(database)
    if not loose:
        return
    files = ", ".join(f"{path} (mode {mode:04o})" for path, mode in loose)
    paths = " ".join(str(path) for path, _ in loose)
    raise ConfigError(
        f"store files are accessible by group or others: {files}; "
        f"run 'qimem init' (which fixes them) or: chmod 600 {paths}",
        code="store_permissions",
    )


def secure_sqlite_files(database: Path) -> list[tuple[Path, int]]:
    """Take group and other access away from each existing store file (``qimem init``).
    Returns ``(path, old mode)`` of each file changed."""
    fixed = []
    for path, mode in _loose_files(database):
        try:
            os.chmod(path, mode & 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot change the mode of {path}: {exc.strerror}") from None
        fixed.append((path, mode))
    return fixed


#: Below this many free bytes on its file system, an SQLite I/O error is reported as a
#: full disk (SQLite itself often says only "disk I/O error", e.g. creating its -shm file).
_LOW_SPACE = 1 << 20
_SPACE_ERRORS = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN")


def space_detail(orig: BaseException, database: Path) -> str:
    """SQLite's own message for ``orig`` (a fixed text, never data), and whether the
    store's file system is full (SQLite often says only "disk I/O error")."""
    detail = str(orig) or type(orig).__name__
    name = getattr(orig, "sqlite_errorname", "") or ""
    if name.startswith(_SPACE_ERRORS):
        try:
            st = os.statvfs(database.parent)
        except OSError:
            st = None
        if st is not None:
            free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
            if free < _LOW_SPACE:
                detail += f"; no space left on the file system of {database}"
    return detail


def enable_wal(cursor: Any) -> None:
    """Switch a SQLite database to WAL. The switch needs an exclusive lock that SQLite does
    not wait for (no busy handler), so processes opening a fresh file at once retry."""
    deadline = time.monotonic() + SQLITE_TIMEOUT
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
