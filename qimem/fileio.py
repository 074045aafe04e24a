"""Crash-safe output files: write a temp file in the target directory, fsync, rename.

A reader never sees a partial output: until the rename, the target either does not exist
or holds its previous complete content. A crash leaves at most a hidden temp file
``.NAME.qimem-tmp-<pid>-<random>`` (``pid`` = the process that owns the run). The next run
that writes into the same directory removes temp files whose owner is no longer alive
(:func:`cleanup_stale_temps`), and a run removes its own on failure or Ctrl-C.

Every temp file qimem writes comes from :func:`create_temp`: a random name (64 bits),
created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600, so a file or symlink an
attacker planted at a name he guessed is never opened, followed or truncated.

Without ``force``, the final step is ``renameat2(RENAME_NOREPLACE)`` (Linux), or
``link(temp, target)`` + ``unlink(temp)`` where that is not supported; both fail if the
target appeared in the meantime, so an existing file is never replaced, even by a race
with another process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from qimem.errors import ConflictError, ValidationError

TEMP_MARKER = ".qimem-tmp-"


@functools.cache
def _libc(name: str) -> Any:
    """The C library's function ``name``, or None; ctypes is loaded on first use (every
    CLI process imports this module). ``CDLL(None)`` is the process's own symbol table,
    which holds libc: no ``find_library`` (it runs ``ldconfig`` in a subprocess)."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name, None)
    except OSError:  # pragma: no cover - no C library (non-POSIX)
        return None


def _get_errno() -> int:
    import ctypes

    return ctypes.get_errno()


_SYNC_FILE_RANGE_WRITE = 2
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
#: From this many files on, one ``syncfs`` is cheaper than an ``fsync`` per file.
SYNCFS_MIN_FILES = 8


def conflict(path: Path) -> ConflictError:
    return ConflictError(f"{path} exists (use --force to overwrite)", code="output_exists")


#: The longest file name most file systems allow (bytes).
NAME_MAX = 255
#: Flags that create a new file and never open an existing one or follow a symlink.
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def temp_name(target: Path, owner: int | None = None) -> Path:
    """A hidden temp path next to ``target`` owned by process ``owner`` (default: us), with
    64 random bits in its name. A long target name is shortened in the temp name, so the
    temp file can be created whenever the target can."""
    owner = os.getpid() if owner is None else owner
    tail = f"{TEMP_MARKER}{owner}-{os.urandom(8).hex()}"
    room = NAME_MAX - 1 - len(tail)
    name = os.fsencode(target.name)
    if len(name) > room:
        name = name[:room]
    return target.with_name(f".{os.fsdecode(name)}{tail}")


def create_temp(
    target: Path, owner: int | None = None, mode: int = 0o600, *, dir_fd: int | None = None
) -> tuple[int, Path]:
    """Create a temp file next to ``target`` (random name, ``O_EXCL | O_NOFOLLOW``, ``mode``
    0600 by default); returns ``(fd, path)``. This is the one way qimem creates temp files.
    With ``dir_fd`` (an open descriptor of ``target``'s directory, see
    :func:`open_dir_below`), the file is created in that very directory, whatever its
    path now resolves to.

    :raises ValidationError: the target directory does not exist or is not writable.
    """
    for _ in range(16):
        tmp = temp_name(target, owner)
        try:
            where = tmp.name if dir_fd is not None else tmp
            return os.open(where, CREATE_FLAGS, mode, dir_fd=dir_fd), tmp
        except FileExistsError:  # taken (or planted): never reuse it, draw another name
            continue
        except FileNotFoundError:
            raise ValidationError(f"output directory {target.parent} does not exist") from None
        except PermissionError:
            raise ValidationError(f"{target.parent}: permission denied") from None
        except NotADirectoryError:
            raise ValidationError(f"{target.parent} is not a directory") from None
    raise ValidationError(f"cannot create a temp file in {target.parent}")  # pragma: no cover


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing ``fd``'s dirty pages now (Linux ``sync_file_range``),
    so the later fsync of a batch finds most of the work done. Best effort."""
    sync_file_range = _libc("sync_file_range")
    if sync_file_range is not None:
        import ctypes

        sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), _SYNC_FILE_RANGE_WRITE)


def sync_files(fds: list[int]) -> None:
    """Make the data of every file in ``fds`` durable.

    Many files (one group, all on one filesystem): one Linux ``syncfs`` call, which waits
    once for the whole filesystem instead of once per file and reports writeback errors
    (Linux >= 5.8). Otherwise, or if ``syncfs`` fails, an ``fsync`` per file.
    """
    syncfs = _libc("syncfs") if len(fds) >= SYNCFS_MIN_FILES else None
    if syncfs is not None and os.environ.get("QIMEM_SYNC") != "fsync":
        devices = {os.fstat(fd).st_dev for fd in fds}
        if len(devices) == 1 and syncfs(fds[0]) == 0:
            return
    for fd in fds:
        os.fsync(fd)


def remove_temp(tmp: Path, dir_fd: int | None = None) -> None:
    """Remove temp file ``tmp`` (relative to ``dir_fd`` when given); gone already is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp.name if dir_fd is not None else tmp, dir_fd=dir_fd)


def commit(tmp: Path, target: Path, *, force: bool, dir_fd: int | None = None) -> None:
    """Move a complete, synced temp file to ``target``. With ``dir_fd`` (the directory
    ``tmp`` was created in, see :func:`create_temp`), both names are relative to it.

    :raises ConflictError: ``target`` exists and ``force`` is false (the temp is removed).
    """
    src: str | Path = tmp.name if dir_fd is not None else tmp
    dst: str | Path = target.name if dir_fd is not None else target
    if force:
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    renameat2 = _libc("renameat2")
    if renameat2 is not None:  # Linux: one atomic rename that refuses to replace
        at = _AT_FDCWD if dir_fd is None else dir_fd
        rc = renameat2(at, os.fsencode(src), at, os.fsencode(dst), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = _get_errno()
        if err == errno.EEXIST:
            remove_temp(tmp, dir_fd)
            raise conflict(target)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(target))
    try:
        os.link(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    except FileExistsError:
        remove_temp(tmp, dir_fd)
        raise conflict(target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A filesystem without hard links: check, then rename (a tiny race remains).
        if os.path.lexists(target) if dir_fd is None else _exists_at(str(dst), dir_fd):
            remove_temp(tmp, dir_fd)
            raise conflict(target) from None
        os.replace(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        return
    remove_temp(tmp, dir_fd)


def _exists_at(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


#: Open a directory, never through a symbolic link (in the last component).
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def unsafe_output_dir(path: Path) -> ValidationError:
    """The per-file error for an output directory that is a link or not a directory."""
    what = "a symbolic link" if os.path.islink(path) else "not a directory"
    return ValidationError(
        f"{path} is {what}: nothing is written through it (outputs stay inside the "
        "output directory)",
        code="unsafe_output_path",
    )


def open_dir_below(
    root: Path, directory: Path, *, create: bool = False, created: list[Path] | None = None
) -> int:
    """An open descriptor of ``directory``, reached from ``root`` one component at a time
    with ``O_DIRECTORY | O_NOFOLLOW`` (``root`` itself is opened normally: the user named
    it). With ``create``, missing components are made (``mkdir`` relative to their
    parent's descriptor) and appended to ``created``. Files created and renamed relative
    to the result (:func:`create_temp`, :func:`commit` with ``dir_fd``) land in
    ``directory`` itself, even if a component is swapped for a link meanwhile.

    :raises ValidationError: a component below ``root`` is a symbolic link or not a
        directory (code ``unsafe_output_path``).
    """
    parts = directory.relative_to(root).parts
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    current = root
    try:
        for part in parts:
            current = current / part
            if create:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
                else:
                    if created is not None:
                        created.append(current)
            try:
                below = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise unsafe_output_dir(current) from None
                exc.filename = str(current)
                raise
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: Path) -> None:
    """Make renames in ``directory`` durable (best effort where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_owner(name: str) -> int | None:
    """The owner pid encoded in a temp file name, or None if ``name`` is not one of ours."""
    if not name.startswith(".") or TEMP_MARKER not in name:
        return None
    tail = name.rsplit(TEMP_MARKER, 1)[1]
    pid, _, token = tail.partition("-")
    if not pid.isdigit() or not token:
        return None
    return int(pid)


def cleanup_stale_temps(directory: Path | int, *, owner: int | None = None) -> int:
    """Remove our temp files in ``directory`` (a path, or an open directory descriptor):
    those of ``owner`` if given, else those whose owner process is gone. Returns how many
    were removed."""
    removed = 0
    dir_fd = directory if isinstance(directory, int) else None
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError:
        return 0
    for entry in entries:
        pid = temp_owner(entry.name)
        if pid is None:
            continue
        if (owner is not None and pid == owner) or (owner is None and not _alive(pid)):
            with contextlib.suppress(OSError):
                os.unlink(entry.name if dir_fd is not None else entry.path, dir_fd=dir_fd)
                removed += 1
    return removed


def cleanup_dirs(directories: Iterable[Path], *, owner: int | None = None) -> int:
    return sum(cleanup_stale_temps(d, owner=owner) for d in directories)


def make_private_dirs(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents with mode 0700 (whatever the umask);
    existing directories are left as they are. Returns the directories created."""
    missing: list[Path] = []
    current = Path(directory)
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # created meanwhile by another process
        os.chmod(path, 0o700)  # a umask like 0o277 would have taken the owner's bits
    return list(reversed(missing))


@contextlib.contextmanager
def atomic_output(
    path: Path, *, force: bool = False, mode: int | None = None
) -> Iterator[BinaryIO]:
    """Yield a file to write; on success it replaces ``path`` atomically and durably.

    The file is written under a :func:`create_temp` name; ``mode`` (default 0600) is set
    exactly, whatever the umask.

    :raises ConflictError: ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    if os.path.lexists(path) and not force:
        raise conflict(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise ValidationError(f"output directory {directory} does not exist")
    fd, tmp = create_temp(path)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        commit(tmp, path, force=force)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(directory)


def read_private_file(path: Path, what: str, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of a secret file (a PIN, a token, a client secret): a
    regular file, not a symlink, that neither group nor others may access. Messages name
    ``what`` and the path, never the content.

    :raises ConfigError: missing, a symlink or otherwise unopenable, not a regular file, or
        accessible by group or others.
    """
    import stat

    from qimem.errors import ConfigError

    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_NONBLOCK", 0)
    )
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(
            f"cannot open {what} {path} ({exc.strerror or type(exc).__name__})"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
            )
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)
