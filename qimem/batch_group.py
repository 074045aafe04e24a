"""One group of files, encrypted or decrypted and committed together (used by
:mod:`qimem.batch` in this process and by :mod:`qimem.batch_parallel`'s workers)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qimem import fileio, stream
from qimem.batch_plan import ENCRYPT, DirFds, FileResult, Task, open_input, output_exists
from qimem.batch_progress import CountingReader
from qimem.errors import QimemError

#: A group of small files committed together: at most this many files ...
GROUP_FILES = 128
#: ... or this many bytes.
GROUP_BYTES = 16 << 20
#: Start writeback of an output every this many bytes (overlaps disk I/O with crypto).
WRITEBACK_BYTES = 16 << 20
#: Files from this size on start their writeback as soon as they are written.
WRITEBACK_MIN = 1 << 20


class _KickingWriter:
    """A raw file wrapper that starts writeback every ``WRITEBACK_BYTES`` written."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._since = 0

    def write(self, data: bytes | memoryview) -> int:
        n = os.write(self.fd, data)
        self._since += n
        if self._since >= WRITEBACK_BYTES:
            fileio.start_writeback(self.fd)
            self._since = 0
        return n


class _Options:
    """One run's settings, shared by its groups. A plain class rather than a dataclass
    (~0.3 ms less at import, on every CLI encryption; issue 13); pickled to the workers of
    ``jobs > 1`` like one.

    ``split_bytes``: with jobs > 1, files at least this big are split into segment ranges
    (batch.SPLIT_BYTES). ``range_bytes``: the largest segment range one worker task seals
    or opens (batch.RANGE_BYTES).
    """

    def __init__(
        self,
        operation: str,
        aad: bytes | None,
        force: bool,
        owner: int,
        split_bytes: int = 8 << 20,
        range_bytes: int = 32 << 20,
    ) -> None:
        self.operation = operation
        self.aad = aad
        self.force = force
        self.owner = owner
        self.split_bytes = split_bytes
        self.range_bytes = range_bytes

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"_Options(operation={self.operation!r}, aad={self.aad!r}, force={self.force!r}, "
            f"owner={self.owner!r}, split_bytes={self.split_bytes!r}, "
            f"range_bytes={self.range_bytes!r})"
        )


def _process_one(
    keyring: stream.Keyring,
    task: Task,
    opts: _Options,
    read: Callable[[int], None] | None = None,
    dir_fd: int | None = None,
) -> tuple[int, Path]:
    """Write ``task``'s output to a new temp file; returns ``(fd, temp path)`` (fd open).
    ``read`` is told the input bytes read, as they are read (progress); ``dir_fd``: the
    output directory's descriptor (:func:`qimem.batch_plan.output_dir_fd`)."""
    assert task.src is not None and task.dst is not None
    if not opts.force and output_exists(task, dir_fd):
        raise fileio.conflict(task.dst)
    fd, tmp = fileio.create_temp(task.dst, opts.owner, dir_fd=dir_fd)
    try:
        with open(open_input(task), "rb", buffering=0) as raw:
            fin: Any = raw if read is None else CountingReader(raw, read)
            out = _KickingWriter(fd)
            if opts.operation == ENCRYPT:
                info = stream.encrypt_stream(fin, out, keyring, aad=opts.aad)  # type: ignore[arg-type]
            else:
                info = stream.decrypt_stream(fin, out, keyring, aad=opts.aad)  # type: ignore[arg-type]
        if task.size >= WRITEBACK_MIN:  # small files: the group's single sync does it all
            fileio.start_writeback(fd)
    except BaseException:
        os.close(fd)
        fileio.remove_temp(tmp, dir_fd)
        raise
    r = task.result
    r.bytes_in = info.plaintext_bytes if opts.operation == ENCRYPT else info.ciphertext_bytes
    r.bytes_out = info.ciphertext_bytes if opts.operation == ENCRYPT else info.plaintext_bytes
    r.key_id, r.version = info.key_id, info.version
    return fd, tmp


def run_group(
    keyring: stream.Keyring,
    tasks: list[Task],
    opts: _Options,
    read: Callable[[int], None] | None = None,
) -> list[FileResult]:
    """Encrypt or decrypt a group of files and commit them together (see module doc).
    ``read`` is told the input bytes read, as they are read (progress)."""
    staged: list[tuple[int, Path, Task]] = []
    dirs = DirFds()
    try:
        for task in tasks:
            try:
                fd, tmp = _process_one(keyring, task, opts, read, dirs.get(task))
            except Exception as exc:  # one bad file never stops the others
                task.result.fail(exc)
                continue
            staged.append((fd, tmp, task))
        directories: dict[Path, int | None] = {}
        try:
            fileio.sync_files([fd for fd, _, _ in staged])
        except OSError as exc:  # a failed flush: nothing of this group may appear
            for _, _, task in staged:
                task.result.fail(exc)
            raise _GroupSyncFailed from exc
        while staged:
            fd, tmp, task = staged[0]
            assert task.dst is not None
            try:
                os.close(fd)
                fd = -1
                dir_fd = dirs.fds.get(task.dst.parent)
                fileio.commit(tmp, task.dst, force=opts.force, dir_fd=dir_fd)
                task.result.ok = True
                directories[task.dst.parent] = dir_fd
            except (QimemError, OSError) as exc:
                if fd >= 0:
                    os.close(fd)
                fileio.remove_temp(tmp, dirs.fds.get(task.dst.parent))
                task.result.fail(exc)
            staged.pop(0)
        for directory, dir_fd in directories.items():
            if dir_fd is None:
                fileio.fsync_dir(directory)
            else:
                with contextlib.suppress(OSError):
                    os.fsync(dir_fd)
    except BaseException as exc:
        for fd, tmp, task in staged:
            with contextlib.suppress(OSError):
                os.close(fd)
            assert task.dst is not None
            fileio.remove_temp(tmp, dirs.fds.get(task.dst.parent))
        if not isinstance(exc, _GroupSyncFailed):
            raise
    finally:
        dirs.close()
    return [t.result for t in tasks]


class _GroupSyncFailed(Exception):
    """Flushing a group failed: its temp files are removed, its files reported failed."""


def _groups(tasks: Iterable[Task]) -> list[list[Task]]:
    groups: list[list[Task]] = []
    current: list[Task] = []
    size = 0
    for task in tasks:
        if current and (len(current) >= GROUP_FILES or size + task.size > GROUP_BYTES):
            groups.append(current)
            current, size = [], 0
        current.append(task)
        size += task.size
    if current:
        groups.append(current)
    return groups
