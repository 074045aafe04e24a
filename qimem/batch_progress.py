"""Progress of batch runs: ``(bytes, files)`` increments for the CLI's progress bar.

Bytes are reported as inputs are read (every :data:`PROGRESS_BYTES` inside a large file), so
the bar moves inside a large file instead of jumping when it is done; files are reported as
they complete.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, BinaryIO

from qimem.batch_plan import Task

#: Report progress inside a file every this many input bytes (a large file moves the bar).
PROGRESS_BYTES = 4 << 20

Progress = Callable[[int, int], None]  # (bytes done, files done) increments

__all__ = ["PROGRESS_BYTES", "CountingReader", "GroupProgress", "Progress"]


class CountingReader:
    """A raw input file that reports the bytes read, every :data:`PROGRESS_BYTES`."""

    def __init__(self, raw: BinaryIO, report: Callable[[int], None]) -> None:
        self._raw = raw
        self._report = report
        self._pending = 0

    def _count(self, n: int) -> None:
        self._pending += n
        if self._pending >= PROGRESS_BYTES:
            self._report(self._pending)
            self._pending = 0

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0  # type: ignore[attr-defined]
        self._count(n)
        return n

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._count(len(data))
        return data


class GroupProgress:
    """Byte reports from inside a group's files, never more than the group's size; the
    group's completion reports the rest with its file count."""

    def __init__(self, report: Progress, tasks: list[Task]) -> None:
        self._report = report
        self._left = sum(t.size for t in tasks)
        self._files = len(tasks)

    def bytes(self, n: int) -> None:
        n = min(n, self._left)
        if n > 0:
            self._left -= n
            self._report(n, 0)

    def done(self) -> None:
        self._report(self._left, self._files)
        self._left = 0
