"""Batch runs with ``jobs > 1``: forked worker processes (see :mod:`qimem.batch`).

Small files are spread over the workers in groups (each committed with
:func:`qimem.batch_group.run_group`); a file of at least :data:`qimem.batch.SPLIT_BYTES` is cut
into segment ranges that workers seal or open in place at known offsets (``pread`` /
``pwrite``) in one temp output, which the parent commits once every range is done. Workers
open their own store connections; no key material is sent between processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem import fileio, stream
from qimem.app import AppContext, build
from qimem.batch_group import _groups, _Options, run_group
from qimem.batch_plan import (
    ENCRYPT,
    FileResult,
    Task,
    check_identity,
    open_input,
    output_dir_fd,
    output_exists,
)
from qimem.batch_progress import Progress
from qimem.errors import QimemError
from qimem.services import files as file_services
from qimem.services.files import KeySource

if TYPE_CHECKING:
    from concurrent.futures import Future

__all__ = ["run_parallel"]

#: How often the parent looks for a Ctrl-C while it waits for its workers (seconds).
INTERRUPT_POLL = 0.1

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
    return build(
        app.config,
        pm=app.registry.pm,
        one_shot=app.one_shot,
        lifecycle=app.lifecycle,
    )


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
    src_ident: tuple[int, int] | None = None,
    tmp_ident: tuple[int, int] | None = None,
) -> int:
    """Seal (or open) segments ``[start, stop)`` of one file into its temp output.
    ``src_ident`` / ``tmp_ident``: the (device, inode) the input and the temp output must
    have (a directory on either path swapped for a link is refused)."""
    keyring = _WORKER["keyring"]
    in_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0))
    check_identity(in_fd, src_ident, src)
    try:
        out_fd = os.open(tmp, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        check_identity(out_fd, tmp_ident, tmp)
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


# ------------------------------------------------------------------------ split files


@dataclass
class _Split:
    """A large file being processed as segment ranges by several workers."""

    task: Task
    fd: int
    tmp: Path
    pending: int
    size: int  # plaintext size (encrypt) or segment bytes (decrypt)
    count: int = 1  # segments
    error: BaseException | None = None
    dir_fd: int | None = None  # the output directory (see batch_plan.output_dir_fd)

    @property
    def ident(self) -> tuple[int, int]:
        st = os.fstat(self.fd)
        return st.st_dev, st.st_ino

    def close(self) -> None:
        """Close the temp file's and the directory's descriptors (idempotent)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self.dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.dir_fd)
            self.dir_fd = None

    def share(self, start: int, stop: int) -> int:
        """The input bytes of segments ``[start, stop)`` for progress (the shares of all
        ranges add up to the file's size exactly)."""
        total = self.task.size
        return total * stop // self.count - total * start // self.count


def _prepare_split(
    keyring: stream.Keyring, task: Task, opts: _Options, jobs: int
) -> tuple[_Split, list[tuple[int, int]]]:
    """Create the temp output (with its header when encrypting) and the segment ranges."""
    assert task.src is not None and task.dst is not None
    dir_fd = output_dir_fd(task)
    try:
        return _prepare_split_in(keyring, task, opts, jobs, dir_fd)
    except BaseException:
        if dir_fd is not None:
            os.close(dir_fd)
        raise


def _prepare_split_in(
    keyring: stream.Keyring, task: Task, opts: _Options, jobs: int, dir_fd: int | None
) -> tuple[_Split, list[tuple[int, int]]]:
    assert task.src is not None and task.dst is not None
    if not opts.force and output_exists(task, dir_fd):
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
    fd, tmp = fileio.create_temp(task.dst, opts.owner, dir_fd=dir_fd)
    try:
        if opts.operation == ENCRYPT:
            os.pwrite(fd, header.encode(), 0)
        os.ftruncate(fd, total)
    except BaseException:
        os.close(fd)
        fileio.remove_temp(tmp, dir_fd)
        raise
    # At least one range per worker, and none over opts.range_bytes: balances the workers and
    # keeps Ctrl-C quick (running tasks are allowed to finish).
    pieces = max(1, min(count, max(jobs, -(-task.size // opts.range_bytes))))
    bounds = [count * i // pieces for i in range(pieces + 1)]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(pieces) if bounds[i] < bounds[i + 1]]
    return _Split(task, fd, tmp, len(ranges), size, max(1, count), dir_fd=dir_fd), ranges


def _finish_split(split: _Split, opts: _Options) -> None:
    task = split.task
    assert task.dst is not None
    try:
        if split.error is not None:
            raise split.error
        os.fsync(split.fd)
        os.close(split.fd)
        split.fd = -1
        fileio.commit(split.tmp, task.dst, force=opts.force, dir_fd=split.dir_fd)
        if split.dir_fd is None:
            fileio.fsync_dir(task.dst.parent)
        else:
            with contextlib.suppress(OSError):
                os.fsync(split.dir_fd)
        task.result.ok = True
    except (QimemError, OSError) as exc:
        task.result.fail(exc)
    finally:
        if not task.result.ok:
            fileio.remove_temp(split.tmp, split.dir_fd)
        split.close()


# ------------------------------------------------------------------------ runner


class _CtrlC:
    """Ctrl-C during a parallel run, noted instead of raised: the run raises
    ``KeyboardInterrupt`` itself between two waits (:meth:`check`).

    Raised by Python's own handler, it could land inside ``concurrent.futures`` (e.g. in
    ``wait()`` between locking two futures), leaving a future's lock held by this thread;
    the pool's manager thread then blocked on it for ever, and so did ``shutdown(wait=True)``.
    Only installed over the default handler, in the main thread (an ignored SIGINT stays
    ignored). Workers forked meanwhile inherit it until their initializer ignores SIGINT."""

    def __init__(self) -> None:
        self.seen = False
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if (
            threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _note(self, signum: int, frame: object) -> None:
        self.seen = True

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt


def run_parallel(
    app: AppContext | KeySource,
    keyring: stream.Keyring,
    todo: list[Task],
    opts: _Options,
    jobs: int,
    keys: tuple[str | None, str, bytes | None],
    report: Progress,
) -> None:
    big = [t for t in todo if t.size >= opts.split_bytes and t.result.error is None]
    small = [t for t in todo if t.size < opts.split_bytes and t.result.error is None]
    groups = _groups(small)
    # Spread small files evenly: no group bigger than an even share of the work.
    if groups and len(groups) < jobs * 2 and len(small) > 1:
        per = max(1, -(-len(small) // (jobs * 2)))
        groups = [small[i : i + per] for i in range(0, len(small), per)]
    with _CtrlC() as ctrl_c:
        _run_pool(app, keyring, big, groups, opts, jobs, keys, report, ctrl_c)


def _run_pool(
    app: AppContext | KeySource,
    keyring: stream.Keyring,
    big: list[Task],
    groups: list[list[Task]],
    opts: _Options,
    jobs: int,
    keys: tuple[str | None, str, bytes | None],
    report: Progress,
    ctrl_c: _CtrlC,
) -> None:
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
            ctrl_c.check()
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
                    task.ident,
                    split.ident,
                )
                futures[future] = ("range", (split, start, stop))
        for group in groups:
            futures[pool.submit(_worker_group, group, opts)] = ("group", group)
        pending = set(futures)
        while pending:
            ctrl_c.check()
            done, pending = wait(pending, INTERRUPT_POLL, return_when=FIRST_COMPLETED)
            for future in done:
                kind, item = futures[future]
                if kind == "group":
                    _collect_group(future, item, report)
                else:
                    _collect_range(future, item, opts, report)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for split in splits:
            if split.fd >= 0 or split.dir_fd is not None:  # not finished yet
                fileio.remove_temp(split.tmp, split.dir_fd)
            split.close()
        raise
    pool.shutdown(wait=True)
    ctrl_c.check()  # every output is complete, but the run was interrupted all the same


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


def _collect_range(
    future: Future[Any], item: tuple[_Split, int, int], opts: _Options, report: Progress
) -> None:
    split, start, stop = item
    try:
        future.result()
    except Exception as exc:
        if split.error is None:
            split.error = exc
    split.pending -= 1
    report(split.share(start, stop), 0)  # a large file's bar moves range by range
    if split.pending == 0:
        _finish_split(split, opts)
        report(0, 1)
