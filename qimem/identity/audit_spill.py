"""The audit spill: where buffered audit records wait while the store cannot take them.

Each process appends to a file of its own in the spill directory,
``spill-<store>-<pid>-<random>.qas`` (``<store>``: a hash of the store URL without its
password, so records are only ever replayed into the database they were meant for). The
file is created ``O_CREAT | O_EXCL | O_NOFOLLOW`` with mode 0600 under a temporary name,
locked (``flock``, exclusive) and only then renamed to its final name; the owner holds the
lock as long as it lives. A file whose lock can be taken belongs to a process that is gone
(a crash, a stopped worker of ``qimem serve --workers N``): any process on the same store
adopts it, replays it and removes it. Files that are symlinks, not regular files, not
owned by the current user or readable by others are refused (reported, never read).

Layout: a header line, then one frame per record::

    b"\\xa7Q" | payload length (u32, big-endian) | CRC-32 of the payload (u32) | payload

The payload is the record's row as compact JSON (the same cleaned fields the database
gets: no secrets). A frame cut short by a crash mid-append (a torn tail) fails its length
or CRC and is skipped; damage in the middle is skipped up to the next intact frame and
reported (the file is then kept as ``*.damaged`` for inspection after its intact records
are replayed). Nothing in a spill file can crash the process reading it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import stat
import struct
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("qimem.audit")

HEADER = b"QIMEM AUDIT SPILL 1\n"
MARKER = b"\xa7Q"
FRAME = struct.Struct(">2sII")  # marker, payload length, CRC-32 of the payload
MAX_PAYLOAD = 64 * 1024  # a row is at most ~1.7 KB; anything longer is damage
SUFFIX = ".qas"
WHEN_FULL = ("drop", "refuse")
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_OPEN_FLAGS = os.O_RDWR | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


class SpillError(Exception):
    """The spill cannot be used (an unsafe directory, an I/O error); the message names the
    path and the problem, never a record."""


@dataclass(frozen=True)
class SpillSettings:
    """Where and how much to spill (``[identity] audit_spill_*``; docs/operations.md)."""

    directory: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    when_full: str = "drop"


def store_key(url: str) -> str:
    """The part of spill file names that names the store (URL without password, hashed)."""
    return hashlib.sha256(url.encode()).hexdigest()[:16]


# -- framing -----------------------------------------------------------------------------


def encode(row: dict[str, Any]) -> bytes:
    """One frame holding ``row``."""
    payload = json.dumps(row, separators=(",", ":"), sort_keys=True).encode()
    return FRAME.pack(MARKER, len(payload), zlib.crc32(payload)) + payload


@dataclass
class Scan:
    """What a spill file holds: intact rows with the offset after each, and what was
    skipped (a torn tail, damaged regions)."""

    rows: list[tuple[dict[str, Any], int]] = field(default_factory=list)
    torn_bytes: int = 0
    damaged: int = 0
    bad_header: bool = False


def _frame_at(data: bytes, pos: int) -> tuple[dict[str, Any], int] | None:
    if len(data) - pos < FRAME.size:
        return None
    marker, length, crc = FRAME.unpack_from(data, pos)
    end = pos + FRAME.size + length
    if marker != MARKER or length > MAX_PAYLOAD or end > len(data):
        return None
    payload = data[pos + FRAME.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        row = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    return (row, end) if isinstance(row, dict) else None


def scan(data: bytes, start: int = 0) -> Scan:
    """The intact frames of a spill file's bytes ``data`` after offset ``start``."""
    result = Scan()
    if not data.startswith(HEADER):
        result.bad_header = True
        return result
    pos = max(start, len(HEADER))
    while pos < len(data):
        found = _frame_at(data, pos)
        if found is not None:
            result.rows.append(found)
            pos = found[1]
            continue
        following = data.find(MARKER, pos + 1)
        while following != -1 and _frame_at(data, following) is None:
            following = data.find(MARKER, following + 1)
        if following == -1:  # nothing intact after it: a torn last append
            result.torn_bytes = len(data) - pos
            break
        result.damaged += 1
        pos = following
    return result


# -- metrics -----------------------------------------------------------------------------

_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()
_METRICS = {
    "spilled": ("qimem_audit_spilled", "Audit records written to the local spill file."),
    "replayed": ("qimem_audit_replayed", "Spilled audit records replayed into the store."),
    "dropped": (
        "qimem_audit_dropped",
        "Audit records lost: the store was down and the spill (or the memory buffer) full.",
    ),
    "damaged": (
        "qimem_audit_spill_damaged",
        "Damaged regions skipped in spill files (a torn last append is not counted).",
    ),
}


def metrics() -> dict[str, Any]:
    """The process-wide audit counters, in no registry (a server's registers them):
    ``qimem_audit_{spilled,replayed,dropped}_total``, ``qimem_audit_spill_damaged_total``."""
    with _metrics_lock:
        if not _metrics:
            from prometheus_client import Counter

            for name, (metric, text) in _METRICS.items():
                _metrics[name] = Counter(metric, text, registry=None)
        return _metrics


def count(name: str, n: int = 1) -> None:
    """Add ``n`` to one of the audit counters."""
    if n:
        metrics()[name].inc(n)


# -- files -------------------------------------------------------------------------------


def _check_directory(directory: Path) -> None:
    """Create the directory 0700 if missing; refuse a symlink, another owner or one that
    group or others may write."""
    from qimem import fileio

    try:
        fileio.make_private_dirs(directory)
        info = os.lstat(directory)
    except OSError as exc:
        raise SpillError(f"audit spill directory {directory}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise SpillError(f"audit spill directory {directory} is a symlink; refusing it")
    if not stat.S_ISDIR(info.st_mode):
        raise SpillError(f"audit spill directory {directory} is not a directory")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise SpillError(
            f"audit spill directory {directory} belongs to uid {info.st_uid}, not to you "
            f"(uid {os.geteuid()}); refusing it"
        )
    if stat.S_IMODE(info.st_mode) & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpillError(
            f"audit spill directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 700 {directory}"
        )


def _unsafe_file(info: os.stat_result) -> str | None:
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not by you"
    if stat.S_IMODE(info.st_mode) & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):04o}, not 0600"
    return None


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    pos = 0
    while pos < size:
        chunk = os.pread(fd, min(size - pos, 1 << 24), pos)
        if not chunk:
            break
        chunks.append(chunk)
        pos += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@dataclass
class Adopted:
    """A dead process's spill file, locked by this one while its records are replayed."""

    path: Path
    fd: int
    found: Scan

    def finish(self) -> None:
        """The records are in the store: remove the file (a damaged one is kept, renamed
        ``*.damaged``, for inspection)."""
        with contextlib.suppress(OSError):
            if self.found.damaged or self.found.bad_header:
                os.rename(self.path, self.path.with_name(self.path.name + ".damaged"))
            else:
                os.unlink(self.path)
        self.release()

    def release(self) -> None:
        """Unlock and close without removing (the store was not reachable)."""
        with contextlib.suppress(OSError):
            os.close(self.fd)


class Spill:
    """This process's spill file (created on first use) and the adoption of others'."""

    def __init__(self, settings: SpillSettings, store: str) -> None:
        self.settings = settings
        self.lock = threading.RLock()
        self._prefix = f"spill-{store}-"
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0  # bytes of this process's file, header included
        self.full = False  # the last append did not fit (cleared when the file drains)
        self.problem: str | None = None  # why the spill cannot be used, once reported
        self._reported: set[str] = set()

    @property
    def path(self) -> Path | None:
        """This process's spill file, once created."""
        return self._path

    @property
    def pending(self) -> bool:
        """Whether this process's file holds records not yet known to be in the store."""
        return self._size > len(HEADER)

    @property
    def size(self) -> int:
        return self._size

    def _report(self, key: str, message: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.error("%s", message)

    def _open(self) -> int:
        if self._fd is not None:
            return self._fd
        directory = self.settings.directory
        _check_directory(directory)
        base = f"{self._prefix}{os.getpid()}-{secrets.token_hex(4)}"
        temp = directory / f".{base}.new"
        final = directory / f"{base}{SUFFIX}"
        flags = _OPEN_FLAGS | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(temp, flags, 0o600)
        except OSError as exc:
            raise SpillError(f"cannot create audit spill file {temp}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before any other can see it
            _write_all(fd, HEADER, 0)
            os.fsync(fd)
            os.rename(temp, final)
            from qimem.fileio import fsync_dir

            fsync_dir(directory)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise SpillError(f"cannot create audit spill file {final}: {exc.strerror}") from None
        self._fd, self._path, self._size = fd, final, len(HEADER)
        return fd

    def append(self, rows: list[dict[str, Any]]) -> int:
        """Append ``rows`` in order, fsynced; returns how many fitted (the rest did not:
        :attr:`full` is set). :raises SpillError: the file cannot be created or written."""
        frames = [encode(row) for row in rows]
        with self.lock:
            fd = self._open()
            room = self.settings.max_bytes - self._size
            taken = used = 0
            for frame in frames:
                if used + len(frame) > room:
                    break
                used += len(frame)
                taken += 1
            if taken < len(frames):
                self.full = True
            if taken:
                try:
                    _write_all(fd, b"".join(frames[:taken]), self._size)
                    os.fsync(fd)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, self._size)  # no half-written frame left behind
                    self.full = True
                    raise SpillError(
                        f"cannot write audit spill file {self._path}: {exc.strerror}"
                    ) from None
                self._size += used
            return taken

    def pending_rows(self, start: int) -> tuple[list[tuple[dict[str, Any], int]], int]:
        """Intact rows of this process's file after offset ``start``, and its size now."""
        with self.lock:
            if self._fd is None or not self.pending:
                return [], self._size
            size = self._size
            data = _read_all(self._fd, size)
        found = scan(data, start)
        return found.rows, size

    def drained(self, end: int) -> bool:
        """Empty the file if nothing was appended after ``end`` (all replayed)."""
        with self.lock:
            if self._fd is None or self._size != end:
                return False
            os.ftruncate(self._fd, len(HEADER))
            os.fsync(self._fd)
            self._size = len(HEADER)
            self.full = False
            return True

    def orphans(self) -> list[Path]:
        """Spill files of this store that are not this process's (live or dead)."""
        try:
            with os.scandir(self.settings.directory) as entries:
                names = sorted(
                    e.name
                    for e in entries
                    if e.name.startswith(self._prefix) and e.name.endswith(SUFFIX)
                )
        except OSError:
            return []
        own = self._path.name if self._path is not None else None
        return [self.settings.directory / name for name in names if name != own]

    def adopt(self, path: Path) -> Adopted | None:
        """Lock and read ``path`` if its owner is gone; None if it is alive, gone, or
        refused (a symlink, another owner, readable by others: reported once)."""
        try:
            _check_directory(self.settings.directory)
            fd = os.open(path, _OPEN_FLAGS)
        except SpillError as exc:
            self._report(str(exc), str(exc))
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._report(str(path), f"audit spill file {path} is a symlink; refusing it")
            elif exc.errno != errno.ENOENT:
                self._report(str(path), f"cannot open audit spill file {path}: {exc.strerror}")
            return None
        try:
            info = os.fstat(fd)
            problem = _unsafe_file(info)
            if problem is not None:
                self._report(str(path), f"audit spill file {path} is {problem}; refusing it")
                os.close(fd)
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # its process is alive
                os.close(fd)
                return None
            try:  # still the file of that name (not removed by another adopter meanwhile)
                now = os.lstat(path)
            except OSError:
                os.close(fd)
                return None
            if (now.st_ino, now.st_dev) != (info.st_ino, info.st_dev):
                os.close(fd)
                return None
            found = scan(_read_all(fd, info.st_size))
        except OSError as exc:
            os.close(fd)
            self._report(str(path), f"cannot read audit spill file {path}: {exc.strerror}")
            return None
        if found.bad_header:
            self._report(str(path), f"audit spill file {path} is not a spill file; skipped it")
        elif found.damaged:
            count("damaged", found.damaged)
            log.error(
                "audit spill file %s is damaged: %d region(s) skipped, %d intact record(s) "
                "replayed; the file is kept as %s.damaged",
                path,
                found.damaged,
                len(found.rows),
                path.name,
            )
        if found.torn_bytes:
            log.warning(
                "audit spill file %s ends in a torn record (%d bytes, a crash mid-write); "
                "skipped it",
                path,
                found.torn_bytes,
            )
        return Adopted(path, fd, found)

    def close(self) -> None:
        """Close this process's file: removed if empty, else left for the next process
        (its lock goes with it)."""
        with self.lock:
            fd, path, self._fd = self._fd, self._path, None
            if fd is None or path is None:
                return
            if not self.pending:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            else:
                log.warning(
                    "%d bytes of audit records wait in %s; they are written to the store "
                    "when qimem next runs on it",
                    self._size - len(HEADER),
                    path,
                )
            with contextlib.suppress(OSError):
                os.close(fd)
