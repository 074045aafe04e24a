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
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from qimem import fileio, stream
from qimem.app import AppContext
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
    open_input,
    output_name,
    plan,
    skipped_of,
    walk,
)
from qimem.errors import ConflictError, QimemError, ValidationError
from qimem.keys import DEFAULT_REALM
from qimem.services import files as file_services
from qimem.services.files import KeySource

if TYPE_CHECKING:
    from concurrent.futures import Future

# multiprocessing and concurrent.futures cost ~50 ms to import: only --jobs > 1 needs them.

#: A group of small files committed together: at most this many files ...
GROUP_FILES = 128
#: ... or this many bytes.
GROUP_BYTES = 16 << 20
#: With jobs > 1, files at least this big are split into segment ranges across workers.
SPLIT_BYTES = 8 << 20
#: The largest segment range one worker task seals or opens.
RANGE_BYTES = 32 << 20
#: Start writeback of an output every this many bytes (overlaps disk I/O with crypto).
WRITEBACK_BYTES = 16 << 20
#: Files from this size on start their writeback as soon as they are written.
WRITEBACK_MIN = 1 << 20

Progress = Callable[[int, int], None]  # (bytes done, files done) increments


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


# ------------------------------------------------------------------------ one group


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


@dataclass
class _Options:
    operation: str
    aad: bytes | None
    force: bool
    owner: int


def _process_one(keyring: stream.Keyring, task: Task, opts: _Options) -> tuple[int, Path]:
    """Write ``task``'s output to a new temp file; returns ``(fd, temp path)`` (fd open)."""
    assert task.src is not None and task.dst is not None
    if not opts.force and os.path.lexists(task.dst):
        raise fileio.conflict(task.dst)
    fd, tmp = fileio.create_temp(task.dst, opts.owner)
    try:
        with open(open_input(task), "rb", buffering=0) as fin:
            out = _KickingWriter(fd)
            if opts.operation == ENCRYPT:
                info = stream.encrypt_stream(fin, out, keyring, aad=opts.aad)  # type: ignore[arg-type]
            else:
                info = stream.decrypt_stream(fin, out, keyring, aad=opts.aad)  # type: ignore[arg-type]
        if task.size >= WRITEBACK_MIN:  # small files: the group's single sync does it all
            fileio.start_writeback(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    r = task.result
    r.bytes_in = info.plaintext_bytes if opts.operation == ENCRYPT else info.ciphertext_bytes
    r.bytes_out = info.ciphertext_bytes if opts.operation == ENCRYPT else info.plaintext_bytes
    r.key_id, r.version = info.key_id, info.version
    return fd, tmp


def run_group(keyring: stream.Keyring, tasks: list[Task], opts: _Options) -> list[FileResult]:
    """Encrypt or decrypt a group of files and commit them together (see module doc)."""
    staged: list[tuple[int, Path, Task]] = []
    try:
        for task in tasks:
            try:
                fd, tmp = _process_one(keyring, task, opts)
            except Exception as exc:  # one bad file never stops the others
                task.result.fail(exc)
                continue
            staged.append((fd, tmp, task))
        directories: set[Path] = set()
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
                fileio.commit(tmp, task.dst, force=opts.force)
                task.result.ok = True
                directories.add(task.dst.parent)
            except (QimemError, OSError) as exc:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                task.result.fail(exc)
            staged.pop(0)
        for directory in directories:
            fileio.fsync_dir(directory)
    except BaseException as exc:
        for fd, tmp, _ in staged:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        if not isinstance(exc, _GroupSyncFailed):
            raise
    return [t.result for t in tasks]


class _GroupSyncFailed(Exception):
    """Flushing a group failed: its temp files are removed, its files reported failed."""


# ------------------------------------------------------------------------ workers

_WORKER: dict[str, Any] = {}


def _set_pdeathsig() -> None:
    """Linux: die with the parent (so a killed run leaves no orphan writing outputs)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)


def _worker_app(app: AppContext | KeySource) -> AppContext | KeySource:
    """A forked worker's own AppContext: never reuse the parent's database connections
    (or a server client's connection: each worker gets its own).

    An in-memory store has no connections and exists only in the parent's memory, so the
    inherited copy is used as is."""
    if not isinstance(app, AppContext):
        return app.for_worker()
    if app.config.store_url.startswith("memory:"):
        return app
    return AppContext(app.config, pm=app.registry.pm)


def _init_worker(
    app: AppContext | KeySource, key_ref: str | None, realm: str, context: bytes | None
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _set_pdeathsig()
    import multiprocessing.util

    worker_app = _worker_app(app)
    if worker_app is not app:  # close its connections when the worker exits normally
        multiprocessing.util.Finalize(None, worker_app.close, exitpriority=10)
    _WORKER["keyring"] = file_services.keyring_for(worker_app, key_ref, realm, context)


def _worker_group(tasks: list[Task], opts: _Options) -> list[FileResult]:
    return run_group(_WORKER["keyring"], tasks, opts)


def _worker_range(
    operation: str,
    src: str,
    tmp: str,
    aad: bytes | None,
    size: int,
    start: int,
    stop: int,
    nofollow: bool = False,
) -> int:
    """Seal (or open) segments ``[start, stop)`` of one file into its temp output."""
    keyring = _WORKER["keyring"]
    in_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))
    try:
        out_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            header_fd = out_fd if operation == ENCRYPT else in_fd
            with open(os.dup(header_fd), "rb") as fh:
                fh.seek(0)
                header = stream.read_header(fh)
            cipher, _ = stream.open_header(header, keyring, aad)
            if operation == ENCRYPT:
                return stream.seal_range(
                    cipher,
                    in_fd,
                    out_fd,
                    header_size=header.size,
                    size=size,
                    start=start,
                    stop=stop,
                )
            return stream.open_range(
                cipher,
                in_fd,
                out_fd,
                header_size=header.size,
                body_size=size,
                start=start,
                stop=stop,
            )
        finally:
            os.close(out_fd)
    finally:
        os.close(in_fd)


def check_key(keyring: stream.Keyring) -> None:
    """Resolve the encryption key once, so a bad ``--key`` fails before any output."""
    _, data_key, _ = keyring.new_data_key()
    data_key[:] = bytes(len(data_key))


def fork_available() -> bool:
    import multiprocessing

    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


# ------------------------------------------------------------------------ split files


@dataclass
class _Split:
    """A large file being processed as segment ranges by several workers."""

    task: Task
    fd: int
    tmp: Path
    pending: int
    size: int  # plaintext size (encrypt) or segment bytes (decrypt)
    error: BaseException | None = None


def _prepare_split(
    keyring: stream.Keyring, task: Task, opts: _Options, jobs: int
) -> tuple[_Split, list[tuple[int, int]]]:
    """Create the temp output (with its header when encrypting) and the segment ranges."""
    assert task.src is not None and task.dst is not None
    if not opts.force and os.path.lexists(task.dst):
        raise fileio.conflict(task.dst)
    r = task.result
    if opts.operation == ENCRYPT:
        algorithm, data_key, wrapped = keyring.new_data_key()
        try:
            header = stream.build_header(algorithm, data_key, wrapped)
        finally:
            data_key[:] = bytes(len(data_key))
        size = task.size
        count = stream.segment_count(size, header.segment_size)
        total = header.size + stream.ciphertext_size(size, header.segment_size, algorithm.tag_size)
        r.bytes_in, r.bytes_out = size, total
        r.key_id, r.version = header.key_id, header.key_version
    else:
        with open(open_input(task), "rb") as fh:
            header = stream.read_header(fh)
            cipher, _ = stream.open_header(header, keyring, opts.aad)  # fail early, in one place
        size = task.size - header.size
        plain = stream.plaintext_size(size, header.segment_size, cipher.tag_size)
        count = -(-size // (header.segment_size + cipher.tag_size))
        total = plain
        r.bytes_in, r.bytes_out = task.size, plain
        r.key_id, r.version = header.key_id, header.key_version
    fd, tmp = fileio.create_temp(task.dst, opts.owner)
    try:
        if opts.operation == ENCRYPT:
            os.pwrite(fd, header.encode(), 0)
        os.ftruncate(fd, total)
    except BaseException:
        os.close(fd)
        tmp.unlink()
        raise
    # At least one range per worker, and none over RANGE_BYTES: balances the workers and
    # keeps Ctrl-C quick (running tasks are allowed to finish).
    pieces = max(1, min(count, max(jobs, -(-task.size // RANGE_BYTES))))
    bounds = [count * i // pieces for i in range(pieces + 1)]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(pieces) if bounds[i] < bounds[i + 1]]
    return _Split(task, fd, tmp, len(ranges), size), ranges


def _finish_split(split: _Split, opts: _Options) -> None:
    task = split.task
    assert task.dst is not None
    try:
        if split.error is not None:
            raise split.error
        os.fsync(split.fd)
        os.close(split.fd)
        split.fd = -1
        fileio.commit(split.tmp, task.dst, force=opts.force)
        fileio.fsync_dir(task.dst.parent)
        task.result.ok = True
    except (QimemError, OSError) as exc:
        task.result.fail(exc)
    finally:
        if split.fd >= 0:
            os.close(split.fd)
        if not task.result.ok:
            with contextlib.suppress(FileNotFoundError):
                split.tmp.unlink()


# ------------------------------------------------------------------------ runner


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
    :param progress: called with (bytes, files) increments as files complete.
    :raises KeyboardInterrupt: after cleaning up this run's temp files.
    """
    if operation not in (ENCRYPT, DECRYPT):
        raise ValidationError(f"unknown batch operation {operation!r}")
    if jobs < 1:
        raise ValidationError("--jobs must be at least 1")
    started = time.perf_counter()
    opts = _Options(operation, aad, force, os.getpid())
    todo = [t for t in tasks if t.result.error is None]
    directories = _prepare_directories(todo)
    report = progress or (lambda _b, _f: None)
    keyring = file_services.keyring_for(app, key_ref, realm, context)
    if operation == ENCRYPT and todo:
        check_key(keyring)
    try:
        if jobs == 1 or len(todo) == 0 or not fork_available():
            for group in _groups(todo):
                run_group(keyring, group, opts)
                report(sum(t.size for t in group), len(group))
        else:
            _run_parallel(app, keyring, todo, opts, jobs, (key_ref, realm, context), report)
    except BaseException:
        fileio.cleanup_dirs(directories, owner=opts.owner)
        raise
    if any(not t.result.ok for t in todo):
        fileio.cleanup_dirs(directories, owner=opts.owner)
    return BatchResult(
        operation, [t.result for t in tasks], time.perf_counter() - started, skipped_of(tasks)
    )


def _prepare_directories(todo: list[Task]) -> set[Path]:
    """Create missing output directories (``--out-dir``) and clear dead runs' temp files."""
    directories: set[Path] = set()
    for task in todo:
        assert task.dst is not None
        parent = task.dst.parent
        if parent in directories:
            continue
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            task.result.fail(exc)
            continue
        directories.add(parent)
        fileio.cleanup_stale_temps(parent)
    return directories


def _run_parallel(
    app: AppContext | KeySource,
    keyring: stream.Keyring,
    todo: list[Task],
    opts: _Options,
    jobs: int,
    keys: tuple[str | None, str, bytes | None],
    report: Progress,
) -> None:
    big = [t for t in todo if t.size >= SPLIT_BYTES and t.result.error is None]
    small = [t for t in todo if t.size < SPLIT_BYTES and t.result.error is None]
    groups = _groups(small)
    # Spread small files evenly: no group bigger than an even share of the work.
    if groups and len(groups) < jobs * 2 and len(small) > 1:
        per = max(1, -(-len(small) // (jobs * 2)))
        groups = [small[i : i + per] for i in range(0, len(small), per)]
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(app, *keys),  # key_ref, realm, context
    )
    futures: dict[Future[Any], tuple[str, Any]] = {}
    splits: list[_Split] = []
    try:
        for task in big:
            try:
                split, ranges = _prepare_split(keyring, task, opts, jobs)
            except (QimemError, OSError) as exc:
                task.result.fail(exc)
                report(task.size, 1)
                continue
            splits.append(split)
            assert task.src is not None
            for start, stop in ranges:
                future = pool.submit(
                    _worker_range,
                    opts.operation,
                    str(task.src),
                    str(split.tmp),
                    opts.aad,
                    split.size,
                    start,
                    stop,
                    task.nofollow,
                )
                futures[future] = ("range", split)
        for group in groups:
            futures[pool.submit(_worker_group, group, opts)] = ("group", group)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = futures[future]
                if kind == "group":
                    _collect_group(future, item, report)
                else:
                    _collect_range(future, item, opts, report)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for split in splits:
            if split.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(split.fd)
                split.fd = -1
            with contextlib.suppress(FileNotFoundError):
                split.tmp.unlink()
        raise
    pool.shutdown(wait=True)


def _collect_group(future: Future[Any], group: list[Task], report: Progress) -> None:
    try:
        results = future.result()
    except Exception as exc:  # a worker died (e.g. killed): the whole group failed
        for task in group:
            task.result.fail(exc)
    else:
        for task, result in zip(group, results, strict=True):
            task.result = result
    report(sum(t.size for t in group), len(group))


def _collect_range(future: Future[Any], split: _Split, opts: _Options, report: Progress) -> None:
    try:
        future.result()
    except Exception as exc:
        if split.error is None:
            split.error = exc
    split.pending -= 1
    if split.pending == 0:
        _finish_split(split, opts)
        report(split.task.size, 1)


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
