"""Batch encryption of files and directory trees: planning, parallel jobs, durable outputs.

Guarantees (DESIGN.md §5, docs/files.md):

* Outputs are written to hidden temp files in the target directory, made durable and
  then renamed; without ``force`` an existing output is never replaced (``link``-based
  commit). A reader never sees a partial output, and inputs are only read.
* Small files are committed in groups: each file's writeback is started as soon as it is
  written, the whole group is fsynced, and only then are the temp files renamed — so
  durability costs one wait per group instead of one per file, and still no final name
  ever points at incomplete data.
* One failing file (unreadable, tampered, existing output) does not stop the others; each
  failure is reported with its reason.
* ``jobs > 1`` uses forked worker processes (cryptography's AEAD calls hold the GIL, so
  threads do not scale). Small files are spread in groups; a large file is cut into
  segment ranges that workers seal or open in place at known offsets (``pread`` /
  ``pwrite``), with no file data passing between processes. Workers open their own store
  connections; no key material is sent between processes.
* Ctrl-C stops dispatching, lets running groups finish, removes this run's temp files and
  raises ``KeyboardInterrupt``. After a SIGKILL, the next run that writes into the same
  directory removes the dead run's temp files.

Planning (output names, directory walks, symlinks) is in :mod:`qimem.batch_plan`, the
worker processes of ``jobs > 1`` in :mod:`qimem.batch_parallel`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from qimem import fileio, stream
from qimem.app import AppContext
from qimem.batch_group import (  # noqa: F401 - the group runner's names, re-exported
    GROUP_BYTES,
    GROUP_FILES,
    WRITEBACK_BYTES,
    WRITEBACK_MIN,
    _groups,
    _Options,
    run_group,
)
from qimem.batch_plan import (
    DECRYPT,
    ENCRYPT,
    REWRAP,
    SUFFIX,
    WRITE_ERRNOS,
    FileResult,
    Plan,
    Skipped,
    Task,
    as_qimem_error,
    output_name,
    plan,
    skipped_of,
    walk,
)
from qimem.batch_progress import GroupProgress, Progress
from qimem.errors import ConflictError, QimemError, ValidationError
from qimem.keys import DEFAULT_REALM
from qimem.services import files as file_services
from qimem.services.files import KeySource

# multiprocessing and concurrent.futures cost ~50 ms to import: only --jobs > 1 needs them.

#: With jobs > 1, files at least this big are split into segment ranges across workers.
SPLIT_BYTES = 8 << 20
#: The largest segment range one worker task seals or opens.
RANGE_BYTES = 32 << 20


@dataclass
class BatchResult:
    """Every file's outcome and the run's totals."""

    operation: str
    results: list[FileResult]
    seconds: float = 0.0
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def failures(self) -> list[FileResult]:
        return [r for r in self.results if not r.ok]

    @property
    def exit_code(self) -> int:
        """0, the failures' common exit code, or 1 when they differ."""
        codes = {r.exit_code for r in self.failures}
        if not codes:
            return 0
        return codes.pop() if len(codes) == 1 else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "files": len(self.results),
            "succeeded": len(self.results) - len(self.failures),
            "failed": len(self.failures),
            "bytes_in": sum(r.bytes_in for r in self.results),
            "bytes_out": sum(r.bytes_out for r in self.results),
            "seconds": round(self.seconds, 6),
            "results": [r.to_dict() for r in self.results],
            "skipped": [s.to_dict() for s in self.skipped],
        }


def check_key(keyring: stream.Keyring) -> None:
    """Resolve the encryption key once, so a bad ``--key`` fails before any output
    (without wrapping a data key when the keyring can check alone: no usage counted)."""
    check = getattr(keyring, "check", None)
    if check is not None:
        check()
        return
    _, data_key, _ = keyring.new_data_key()
    data_key[:] = bytes(len(data_key))


def fork_available() -> bool:
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


# ------------------------------------------------------------------------ runner


def run(
    app: AppContext | KeySource,
    tasks: list[Task],
    operation: str,
    *,
    key_ref: str | None = None,
    aad: bytes | None = None,
    force: bool = False,
    jobs: int = 1,
    realm: str = DEFAULT_REALM,
    progress: Progress | None = None,
    context: bytes | None = None,
) -> BatchResult:
    """Encrypt or decrypt the planned ``tasks`` (see :func:`plan`).

    :param jobs: worker processes (1 = in this process).
    :param context: for a derived key: the per-context subkey wraps each file's data key,
        and the same context is needed to decrypt.
    :param progress: called with (bytes, files) increments: bytes as they are read (every
        :data:`qimem.batch_progress.PROGRESS_BYTES` inside a large file; per segment range
        with ``jobs > 1``),
        files as they complete.
    :raises KeyboardInterrupt: after cleaning up this run's temp files.

    Output directories this run creates (``--out-dir``) are removed again if nothing was
    written into them (e.g. every input failed).
    """
    if operation not in (ENCRYPT, DECRYPT):
        raise ValidationError(f"unknown batch operation {operation!r}")
    if jobs < 1:
        raise ValidationError("--jobs must be at least 1")
    started = time.perf_counter()
    opts = _Options(operation, aad, force, os.getpid(), SPLIT_BYTES, RANGE_BYTES)
    todo = [t for t in tasks if t.result.error is None]
    created: list[Path] = []
    try:
        directories = _prepare_directories(todo, created)
        report = progress or (lambda _b, _f: None)
        keyring = file_services.keyring_for(app, key_ref, realm, context)
        if operation == ENCRYPT and todo:
            check_key(keyring)
        try:
            if jobs == 1 or len(todo) == 0 or not fork_available():
                for group in _groups(todo):
                    counter = GroupProgress(report, group)
                    run_group(keyring, group, opts, counter.bytes if progress else None)
                    counter.done()
            else:
                from qimem.batch_parallel import run_parallel

                run_parallel(app, keyring, todo, opts, jobs, (key_ref, realm, context), report)
        except BaseException:
            fileio.cleanup_dirs(directories, owner=opts.owner)
            raise
        if any(not t.result.ok for t in todo):
            fileio.cleanup_dirs(directories, owner=opts.owner)
    finally:
        _remove_empty(created)
    return BatchResult(
        operation, [t.result for t in tasks], time.perf_counter() - started, skipped_of(tasks)
    )


def _prepare_directories(todo: list[Task], created: list[Path]) -> set[Path]:
    """Create missing output directories (``--out-dir``; appended to ``created``, parents
    first) and clear dead runs' temp files. Below a task's output root, directories are
    created and checked without following links (:func:`qimem.fileio.open_dir_below`): a
    component that is a link or not a directory fails that task alone."""
    directories: set[Path] = set()
    refused: dict[Path, QimemError] = {}
    for task in todo:
        assert task.dst is not None
        parent = task.dst.parent
        if parent in directories:
            continue
        if parent in refused:
            task.result.fail(refused[parent])
            continue
        root = task.out_root if task.out_root is not None else parent
        missing: list[Path] = []
        current = root
        while not os.path.lexists(current) and current != current.parent:
            missing.append(current)
            current = current.parent
        try:
            for path in reversed(missing):  # the root and its parents: named by the user
                with contextlib.suppress(FileExistsError):  # made meanwhile by someone else
                    path.mkdir()
                    created.append(path)
            fd = None
            if parent != root:
                fd = fileio.open_dir_below(root, parent, create=True, created=created)
        except QimemError as exc:
            refused[parent] = exc
            task.result.fail(exc)
            continue
        except OSError as exc:
            task.result.fail(exc)
            continue
        directories.add(parent)
        if fd is None:
            fileio.cleanup_stale_temps(parent)
        else:  # through the descriptor: never scan or unlink through a link
            try:
                fileio.cleanup_stale_temps(fd)
            finally:
                os.close(fd)
    return directories


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this run created that are still empty (children first)."""
    for path in reversed(created):
        with contextlib.suppress(OSError):  # not empty (an output, or someone else's file)
            path.rmdir()


# ------------------------------------------------------------------------ stdin / stdout


def run_stream(
    app: AppContext | KeySource,
    operation: str,
    src: BinaryIO,
    dst: BinaryIO | Path,
    *,
    key_ref: str | None = None,
    aad: bytes | None = None,
    force: bool = False,
    realm: str = DEFAULT_REALM,
    context: bytes | None = None,
) -> stream.StreamInfo:
    """Encrypt or decrypt one file object (standard input) to a file object or a path.

    A path is written atomically (temp file, fsync, rename), like batch outputs.
    """
    keyring = file_services.keyring_for(app, key_ref, realm, context)

    def work(out: BinaryIO) -> stream.StreamInfo:
        if operation == ENCRYPT:
            return stream.encrypt_stream(src, out, keyring, aad=aad)
        return stream.decrypt_stream(src, out, keyring, aad=aad)

    output = "standard output" if not isinstance(dst, Path) else str(dst)
    try:
        if not isinstance(dst, Path):
            info = work(dst)
            flush = getattr(dst, "flush", None)
            if flush is not None:  # a buffered stream: a full disk shows here, not at exit
                flush()
            return info
        if operation == ENCRYPT:
            check_key(keyring)
        with fileio.atomic_output(dst, force=force) as fh:
            return work(fh)
    except BrokenPipeError:
        raise  # the reader went away (``| head``): the CLI ends quietly
    except OSError as exc:
        raise as_qimem_error(exc, "standard input", output=output) from None


def rewrap(
    app: AppContext | KeySource,
    tasks: list[Task],
    *,
    realm: str = DEFAULT_REALM,
    progress: Progress | None = None,
    context: bytes | None = None,
) -> BatchResult:
    """Rewrap each planned file in place (only the header changes; see
    :func:`qimem.services.files.rewrap_file`)."""
    started = time.perf_counter()
    directories = {t.src.parent for t in tasks if t.src is not None and t.result.error is None}
    for directory in directories:
        fileio.cleanup_stale_temps(directory)
    for task in tasks:
        if task.result.error is not None:
            continue
        assert task.src is not None
        # A symlink (named, or followed with --follow-symlinks): rewrap the file it points
        # to and keep the link, instead of replacing the link with a copy.
        target = Path(os.path.realpath(task.src)) if task.src.is_symlink() else task.src
        try:
            info, changed = file_services.rewrap_file(app, target, realm=realm, context=context)
        except (QimemError, OSError) as exc:
            task.result.fail(exc)
        else:
            r = task.result
            r.ok, r.changed = True, changed
            r.bytes_in = r.bytes_out = info.ciphertext_bytes
            r.key_id, r.version = info.key_id, info.version
        if progress:
            progress(task.size, 1)
    return BatchResult(
        REWRAP, [t.result for t in tasks], time.perf_counter() - started, skipped_of(tasks)
    )


def error_line(result: FileResult) -> str:
    """``PATH: reason`` (the reason already names the path when it is about the file)."""
    message = result.message or "failed"
    return message if result.input in message else f"{result.input}: {message}"


__all__ = [
    "DECRYPT",
    "ENCRYPT",
    "REWRAP",
    "SUFFIX",
    "WRITE_ERRNOS",
    "BatchResult",
    "ConflictError",
    "FileResult",
    "Plan",
    "Skipped",
    "Task",
    "as_qimem_error",
    "output_name",
    "walk",
    "error_line",
    "plan",
    "rewrap",
    "run",
    "run_group",
    "run_stream",
]
