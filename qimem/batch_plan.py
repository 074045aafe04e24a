"""Planning a batch run: which inputs, which outputs, and what a directory walk skips.

Rules (docs/files.md):

* An output name is derived from its input's name (``NAME`` -> ``NAME.qimem`` and back) and
  must be a plain name: a file named ``.qimem``, ``..qimem`` or ``...qimem`` has no safe
  output name (it would be empty, ``.`` or ``..``), so that one file fails with a clear
  error and the others go on. An output never lands outside ``--out-dir``, nor *as* it.
* Directory walks do not follow symbolic links (to files or directories) unless
  ``follow_symlinks``: each one is reported as skipped (:class:`Skipped`), and the files
  a walk found are later opened with ``O_NOFOLLOW``, so a file swapped for a link in the
  meantime is refused too. A link named on the command line is followed. With
  ``follow_symlinks``, each directory is walked once (by device and inode), so a link
  loop cannot hang the walk.
* ``O_NOFOLLOW`` covers only the last path component, so the walk also opens each
  directory below the root with ``O_NOFOLLOW`` (a directory swapped for a link while it
  is walked is skipped) and records each file's device and inode as it found it; the
  file opened later must be that same file (:func:`open_input`), or it is refused
  (``input_changed``): a parent directory swapped for a link cannot redirect the read.
* Outputs of a directory walk are written through a descriptor of their directory,
  opened component by component below the walk's output root (``--out-dir``, or the
  walked directory itself) with ``O_NOFOLLOW`` (:func:`qimem.fileio.open_dir_below`):
  nothing is written through a link below that root (``unsafe_output_path``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qimem import fileio
from qimem.errors import QimemError, ValidationError

SUFFIX = ".qimem"
ENCRYPT = "encrypt"
DECRYPT = "decrypt"
REWRAP = "rewrap"


@dataclass
class FileResult:
    """The outcome for one input."""

    input: str
    output: str | None
    ok: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    key_id: str | None = None
    version: int | None = None
    changed: bool | None = None
    error: str | None = None
    message: str | None = None
    exit_code: int = 0

    def fail(self, exc: BaseException) -> FileResult:
        error = as_qimem_error(exc, self.input, output=self.output)
        self.ok = False
        self.error = error.code
        self.message = error.message
        self.exit_code = error.exit_code
        return self

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("exit_code")
        if self.changed is None:
            data.pop("changed")
        return data


@dataclass
class Task:
    """One input and where its output goes (``None`` = standard input / output).

    ``nofollow``: the input was found by a directory walk that does not follow symlinks,
    so it is opened with ``O_NOFOLLOW``. ``ident``: the (device, inode) the walk found the
    input as; the opened file must match. ``out_root``: outputs below this directory are
    written through descriptors opened without following links (see module doc).
    """

    src: Path | None
    dst: Path | None
    size: int = 0
    index: int = 0
    result: FileResult = field(default_factory=lambda: FileResult("-", "-"))
    nofollow: bool = False
    ident: tuple[int, int] | None = None
    out_root: Path | None = None


class InputChanged(OSError):
    """The file opened is not the one the directory walk found (a directory on its path
    was replaced, e.g. by a symbolic link)."""


def check_identity(fd: int, ident: tuple[int, int] | None, path: object) -> None:
    """Raise :class:`InputChanged` (and close ``fd``) unless ``fd`` is the file ``ident``."""
    if ident is None:
        return
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != ident:
        os.close(fd)
        raise InputChanged(errno.ESTALE, "changed since it was listed", str(path))


@dataclass
class Skipped:
    """An entry a directory walk did not process, and why (``reason``: ``symlink``,
    ``loop``, ``broken_symlink`` or ``unreadable``)."""

    input: str
    reason: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Plan(list[Task]):
    """The planned tasks, plus what the directory walks skipped (:attr:`skipped`)."""

    def __init__(self, tasks: Iterable[Task] = (), skipped: Iterable[Skipped] = ()) -> None:
        super().__init__(tasks)
        self.skipped: list[Skipped] = list(skipped)


def skipped_of(tasks: Sequence[Task]) -> list[Skipped]:
    return list(tasks.skipped) if isinstance(tasks, Plan) else []


#: Failures only writing can cause (a full disk, a quota, a file size limit, a read-only
#: mount): they are reported on the output, not the input.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def as_qimem_error(exc: BaseException, what: str, *, output: str | None = None) -> QimemError:
    """A QimemError for any per-file failure, with a message that names nothing secret.

    ``what`` names the input; a write failure (:data:`WRITE_ERRNOS`) names ``output``
    instead of the temp file it happened on.
    """
    if isinstance(exc, QimemError):
        return exc
    if isinstance(exc, InputChanged):
        return ValidationError(
            f"{exc.filename or what} changed since the directory walk listed it (a directory"
            " on its path was replaced, e.g. by a symbolic link): not read",
            code="input_changed",
        )
    if isinstance(exc, OSError) and output and exc.errno in WRITE_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        return QimemError(f"cannot write {output}: {reason}", code="write_failed")
    if isinstance(exc, FileNotFoundError):
        return ValidationError(f"{exc.filename or what}: no such file")
    if isinstance(exc, IsADirectoryError):
        return ValidationError(f"{exc.filename or what} is a directory")
    if isinstance(exc, PermissionError):
        return ValidationError(f"{exc.filename or what}: permission denied")
    if isinstance(exc, OSError) and exc.errno == errno.ELOOP:
        return ValidationError(
            f"{exc.filename or what} is a symbolic link (not followed; see --follow-symlinks)"
        )
    if isinstance(exc, OSError):
        return QimemError(f"{exc.filename or what}: {exc.strerror or type(exc).__name__}")
    return QimemError(f"{what}: internal error ({type(exc).__name__})")


# ------------------------------------------------------------------------ output names


def output_name(src: Path, operation: str) -> str | None:
    """The output name for input ``src``: ``NAME.qimem`` when encrypting, ``NAME`` for
    ``NAME.qimem`` when decrypting; None for a decryption input without the suffix.

    :raises ValidationError: the derived name is not a plain file name (``.qimem`` ->
        ``""``, ``..qimem`` -> ``.``, ``...qimem`` -> ``..``).
    """
    name = src.name
    if operation == ENCRYPT:
        derived = name + SUFFIX
    elif operation == REWRAP:
        derived = name
    elif name.endswith(SUFFIX):
        derived = name[: -len(SUFFIX)]
    else:
        return None
    if derived in ("", ".", "..") or "/" in derived or os.sep in derived or "\0" in derived:
        raise ValidationError(
            f"{src}: no safe output name can be derived from this file name "
            f"(it would be {derived!r}); rename it, or decrypt it alone with -o OUTPUT",
            code="bad_file_name",
        )
    return derived


# ------------------------------------------------------------------------ walking


def _wanted(name: str, operation: str) -> bool:
    if fileio.temp_owner(name) is not None:
        return False
    if operation == ENCRYPT:
        return not name.endswith(SUFFIX)
    return name.endswith(SUFFIX)


def _skip(path: Path, reason: str) -> Skipped:
    messages = {
        "symlink": "a symbolic link, not followed (use --follow-symlinks to follow it)",
        "loop": "a symbolic link to a directory already walked (a loop), not followed again",
        "broken_symlink": "a symbolic link to nothing",
        "unreadable": "a directory that cannot be read",
        "changed": "a directory replaced while it was walked, not walked",
    }
    return Skipped(str(path), reason, f"skipped {path}: {messages[reason]}")


def walk(
    root: Path,
    operation: str,
    *,
    follow_symlinks: bool = False,
    stats: dict[Path, os.stat_result] | None = None,
) -> tuple[list[Path], list[Skipped]]:
    """Regular files under ``root`` to process (depth first, sorted by name), minus our
    temp files and, when encrypting, files that already end in ``.qimem`` (when
    decrypting or rewrapping, only those). Returns the files and the entries skipped;
    ``stats`` receives each file's status as the walk found it (relative to the descriptor
    of the directory that listed it).

    Directories below ``root`` are opened with ``O_NOFOLLOW`` (unless
    ``follow_symlinks``) and must be the directory their parent listed (device, inode).
    """
    found: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, tuple[int, int] | None]] = [(root, None)]
    nofollow = 0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0)
    while stack:
        directory, expected = stack.pop()
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (nofollow if expected else 0)
        try:
            fd = os.open(directory, flags)
        except OSError as exc:
            if expected is not None and exc.errno in (errno.ELOOP, errno.ENOTDIR):
                skipped.append(_skip(directory, "symlink"))  # swapped for a link meanwhile
            else:
                skipped.append(_skip(directory, "unreadable"))
            continue
        try:
            subdirs = _list(fd, directory, expected, operation, follow_symlinks, seen, found,
                            skipped, stats)  # fmt: skip
        finally:
            os.close(fd)  # only now: the entries stat relative to it
        stack.extend(reversed(subdirs))
    return found, skipped


def _list(
    fd: int,
    directory: Path,
    expected: tuple[int, int] | None,
    operation: str,
    follow_symlinks: bool,
    seen: set[tuple[int, int]],
    found: list[Path],
    skipped: list[Skipped],
    stats: dict[Path, os.stat_result] | None,
) -> list[tuple[Path, tuple[int, int]]]:
    """One directory of :func:`walk` (open as ``fd``): its files go to ``found``, and its
    subdirectories to walk are returned with the (device, inode) they must have."""
    try:
        st = os.fstat(fd)
        if expected is not None and (st.st_dev, st.st_ino) != expected:
            skipped.append(_skip(directory, "changed"))
            return []
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(_skip(directory, "loop"))
            return []
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        skipped.append(_skip(directory, "unreadable"))
        return []
    subdirs: list[tuple[Path, tuple[int, int]]] = []
    for entry in entries:
        path = directory / entry.name
        try:
            if entry.is_symlink():
                if not follow_symlinks:
                    if entry.is_dir() or _wanted(entry.name, operation):
                        skipped.append(_skip(path, "symlink"))
                    continue
                if entry.is_dir():
                    target = entry.stat()
                    subdirs.append((path, (target.st_dev, target.st_ino)))
                elif not os.path.exists(path):
                    if _wanted(entry.name, operation):
                        skipped.append(_skip(path, "broken_symlink"))
                elif entry.is_file() and _wanted(entry.name, operation):
                    found.append(path)
                    if stats is not None:
                        stats[path] = entry.stat()
            elif entry.is_dir(follow_symlinks=False):
                here = entry.stat(follow_symlinks=False)
                subdirs.append((path, (here.st_dev, here.st_ino)))
            elif entry.is_file(follow_symlinks=False) and _wanted(entry.name, operation):
                found.append(path)
                if stats is not None:
                    stats[path] = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # vanished while walking
    return subdirs


# ------------------------------------------------------------------------ planning


def plan(
    inputs: Sequence[str | os.PathLike[str]],
    operation: str,
    *,
    output: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    follow_symlinks: bool = False,
) -> Plan:
    """Tasks for the given files and directories (directories are walked recursively and
    their relative paths kept under ``out_dir``). Problems found here (missing input, no
    safe output name) become failed tasks, so one bad argument does not stop the rest;
    symlinks a walk skips are listed in the plan's ``skipped``.
    """
    if output is not None and out_dir is not None:
        raise ValidationError("use either -o or --out-dir, not both")
    pairs: list[tuple[Path, Path | None, Exception | None, bool]] = []
    skipped: list[Skipped] = []
    stats: dict[Path, os.stat_result] = {}
    roots: dict[Path, Path] = {}  # a walked input -> the root its output must stay below
    for raw in inputs:
        arg = Path(raw)
        if arg.is_dir():
            if output is not None:
                raise ValidationError(f"{arg} is a directory: use --out-dir, not -o")
            paths, skips = walk(arg, operation, follow_symlinks=follow_symlinks, stats=stats)
            skipped += skips
            for path in paths:
                roots[path] = Path(out_dir) if out_dir else arg
                base = Path(out_dir) / path.parent.relative_to(arg) if out_dir else path.parent
                try:
                    name = output_name(path, operation)
                except ValidationError as exc:
                    pairs.append((path, None, exc, not follow_symlinks))
                    continue
                assert name is not None  # a walk only finds names that have one
                pairs.append((path, base / name, None, not follow_symlinks))
            continue
        if output is not None:
            pairs.append((arg, Path(output), None, False))
            continue
        if operation == REWRAP:
            pairs.append((arg, arg, None, False))
            continue
        try:
            name = output_name(arg, operation)
        except ValidationError as exc:
            pairs.append((arg, None, exc, False))
            continue
        if name is None:
            if out_dir is not None:
                name = arg.name
            else:
                refusal = ValidationError(
                    f"{arg} does not end in {SUFFIX}; name the output with -o or --out-dir"
                )
                pairs.append((arg, None, refusal, False))
                continue
        pairs.append((arg, (Path(out_dir) if out_dir else arg.parent) / name, None, False))
    if output is not None and len(pairs) > 1:
        raise ValidationError("-o names one output; use --out-dir for several inputs")
    tasks = Plan(skipped=skipped)
    for index, (src, dst, err, nofollow) in enumerate(pairs):
        task = Task(src, dst, 0, index, FileResult(str(src), str(dst) if dst else None))
        task.nofollow = nofollow
        walked = stats.get(src) if src in roots else None
        if walked is not None:
            task.ident = (walked.st_dev, walked.st_ino)
            task.out_root = roots[src]
        if err is not None:
            task.result.fail(err)
        else:
            try:
                st = walked or (os.lstat(src) if nofollow else src.stat())
                regular = stat.S_ISREG(st.st_mode) if walked else os.path.isfile(src)
                if not regular:
                    raise ValidationError(f"{src} is not a regular file")
                task.size = st.st_size
                if (
                    dst is not None
                    and operation != REWRAP
                    and dst.exists()
                    and os.path.samefile(src, dst)
                ):
                    raise ValidationError(f"{src}: the output would overwrite the input")
            except (OSError, QimemError) as exc:
                task.result.fail(exc)
        tasks.append(task)
    return tasks


def output_dir_fd(task: Task) -> int | None:
    """A descriptor of ``task``'s output directory opened without following links below
    its output root (:func:`qimem.fileio.open_dir_below`), or None when the output goes
    straight into the root or a path the user named (no walk)."""
    assert task.dst is not None
    if task.out_root is None or task.dst.parent == task.out_root:
        return None
    return fileio.open_dir_below(task.out_root, task.dst.parent)


class DirFds:
    """Output directory descriptors of one group, opened once per directory."""

    def __init__(self) -> None:
        self.fds: dict[Path, int | None] = {}

    def get(self, task: Task) -> int | None:
        assert task.dst is not None
        parent = task.dst.parent
        if parent not in self.fds:
            self.fds[parent] = output_dir_fd(task)  # a failure is not cached: that task fails
        return self.fds[parent]

    def close(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()


def output_exists(task: Task, dir_fd: int | None) -> bool:
    """Whether ``task``'s output exists (relative to ``dir_fd`` when given)."""
    assert task.dst is not None
    if dir_fd is None:
        return os.path.lexists(task.dst)
    try:
        os.stat(task.dst.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_input(task: Task) -> int:
    """An O_RDONLY descriptor of ``task``'s input (``O_NOFOLLOW`` for walked files).

    :raises InputChanged: a walked input is not the file the walk found (a directory on
        its path was swapped, e.g. for a symbolic link, after the walk).
    """
    assert task.src is not None
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NOFOLLOW if task.nofollow else 0)
    fd = os.open(task.src, flags)
    check_identity(fd, task.ident, task.src)
    return fd
