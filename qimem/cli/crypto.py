"""``qimem encrypt``, ``qimem decrypt`` and ``qimem rewrap``: stream format v1 over
standard input/output, single files, many files and directory trees (docs/files.md)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from qimem import batch
from qimem.cli.context import CliState, Command, echo_json, json_option, pass_state
from qimem.errors import QimemError, ValidationError


def _aad(text: str | None) -> bytes | None:
    return text.encode("utf-8") if text else None


_CONTEXT_HELP = (
    "Derivation context of a derived key (e.g. a tenant id; UTF-8): the per-context subkey "
    "wraps each file's data key, and the same context is needed to decrypt and rewrap."
)
context_option = click.option("--context", "context", help=_CONTEXT_HELP)
follow_option = click.option(
    "--follow-symlinks",
    is_flag=True,
    help="Follow symbolic links found while walking directories (default: skip each one, "
    "with a line on stderr). Links named on the command line are always followed.",
)


def _options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.argument("files", nargs=-1, type=click.Path()),
            click.option(
                "-o", "--output", help="Output file for one input ('-': standard output)."
            ),
            click.option(
                "--out-dir",
                type=click.Path(file_okay=False),
                help="Write outputs here, keeping paths relative to each directory given.",
            ),
            click.option(
                "-j",
                "--jobs",
                type=click.IntRange(1, 256),
                default=1,
                show_default=True,
                help="Worker processes.",
            ),
            click.option(
                "--aad", help="Associated data (encryption context); needed again to decrypt."
            ),
            context_option,
            click.option("--force", is_flag=True, help="Overwrite existing outputs."),
            follow_option,
            click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
            json_option,
        ]
    ):
        func = option(func)
    return func


@contextmanager
def _progress(quiet: bool, tasks: list[batch.Task]) -> Iterator[batch.Progress | None]:
    """A bytes-and-files progress bar on a terminal; nothing when piped or with --quiet."""
    todo = [t for t in tasks if t.result.error is None]
    if quiet or not todo or not sys.stderr.isatty():
        yield None
        return
    total_files = len(todo)
    done = [0]
    with click.progressbar(
        length=max(1, sum(t.size for t in todo)),
        label=f"0/{total_files} files",
        file=sys.stderr,
        show_eta=True,
        show_percent=True,
    ) as bar:

        def update(nbytes: int, nfiles: int) -> None:
            done[0] += nfiles
            bar.label = f"{done[0]}/{total_files} files"
            bar.update(nbytes)

        yield update


def _finish(result: batch.BatchResult, json_: bool) -> None:
    """Print the --json summary, name each skipped and failed file, and fail with the right
    exit code (skipped entries are not failures)."""
    for skipped in result.skipped:
        click.echo(f"qimem: {skipped.message}", err=True)
    if json_:
        echo_json(result.to_dict())
    failures = result.failures
    if not failures:
        return
    if len(failures) == 1:
        error = QimemError(batch.error_line(failures[0]), code=failures[0].error)
        error.exit_code = failures[0].exit_code
        raise error
    for failure in failures:
        click.echo(f"qimem: error: {batch.error_line(failure)}", err=True)
    error = QimemError(
        f"{len(failures)} of {len(result.results)} files failed", code="batch_failed"
    )
    error.exit_code = result.exit_code
    raise error


def _refuse_terminal_stdin(operation: str) -> None:
    """With no FILES and a terminal on standard input, the user most likely forgot the
    FILES: say so instead of waiting silently for typed input."""
    if sys.stdin is not None and sys.stdin.isatty():
        verb = "encrypt" if operation == batch.ENCRYPT else "decrypt"
        raise ValidationError(
            f"no FILES given and standard input is a terminal; name the files to {verb}, "
            f"or pipe data in (e.g. 'qimem {verb} ... < FILE')"
        )


def _stdio(
    state: CliState,
    operation: str,
    output: str | None,
    key_ref: str | None,
    aad: str | None,
    force: bool,
    json_: bool,
    context: str | None,
    source: str | None = None,
) -> None:
    """Standard input (or the one file ``source``) to standard output (or to -o OUT,
    atomically)."""
    app = state.backend
    to_stdout = output is None or output == "-"
    if to_stdout and operation == batch.ENCRYPT and sys.stdout.isatty():
        raise ValidationError("refusing to write ciphertext to a terminal; use -o or a pipe")
    with contextlib.ExitStack() as stack:
        if source is None:
            src = sys.stdin.buffer
            src_raw = getattr(src, "raw", src)
        else:
            try:
                src_raw = stack.enter_context(open(source, "rb", buffering=0))  # noqa: SIM115
            except OSError as exc:
                raise batch.as_qimem_error(exc, source) from None
        out: Any = sys.stdout.buffer if to_stdout else Path(output)  # type: ignore[arg-type]
        info = batch.run_stream(
            app,
            operation,
            src_raw,
            out,
            key_ref=key_ref,
            aad=_aad(aad),
            force=force,
            realm=state.realm,
            context=_aad(context),
        )
    if to_stdout:
        sys.stdout.buffer.flush()
    if json_:
        summary = {
            "operation": operation,
            "input": "-" if source is None else source,
            "output": "-" if to_stdout else output,
            "key_id": info.key_id,
            "version": info.version,
            "bytes_in": info.plaintext_bytes
            if operation == batch.ENCRYPT
            else info.ciphertext_bytes,
            "bytes_out": info.ciphertext_bytes
            if operation == batch.ENCRYPT
            else info.plaintext_bytes,
        }
        if to_stdout:  # standard output carries the data: the summary goes to stderr
            click.echo(__import__("json").dumps(summary, sort_keys=True), err=True)
        else:
            echo_json(summary)


def _files(
    state: CliState,
    operation: str,
    files: tuple[str, ...],
    output: str | None,
    out_dir: str | None,
    jobs: int,
    key_ref: str | None,
    aad: str | None,
    force: bool,
    quiet: bool,
    json_: bool,
    context: str | None,
    follow_symlinks: bool,
) -> None:
    if output == "-":
        if out_dir is not None:
            raise ValidationError("use either -o or --out-dir, not both")
        if len(files) != 1 or Path(files[0]).is_dir():
            raise ValidationError("-o - (standard output) takes one input file, not several")
        key = key_ref if operation == batch.ENCRYPT else None
        _stdio(state, operation, "-", key, aad, force, json_, context, source=files[0])
        return
    tasks = batch.plan(
        files, operation, output=output, out_dir=out_dir, follow_symlinks=follow_symlinks
    )
    app = state.backend
    with _progress(quiet, tasks) as progress:
        result = batch.run(
            app,
            tasks,
            operation,
            key_ref=key_ref,
            aad=_aad(aad),
            force=force,
            jobs=jobs,
            realm=state.realm,
            progress=progress,
            context=_aad(context),
        )
    _finish(result, json_)


@click.command(cls=Command)
@click.option("--key", "key_ref", required=True, help="Key name, lineage_id or active key_id.")
@_options
@pass_state
def encrypt(
    state: CliState,
    key_ref: str,
    files: tuple[str, ...],
    output: str | None,
    out_dir: str | None,
    jobs: int,
    aad: str | None,
    context: str | None,
    force: bool,
    follow_symlinks: bool,
    quiet: bool,
    json_: bool,
) -> None:
    """Encrypt FILES and directories (or standard input) under the active version of --key.

    Each FILE becomes FILE.qimem beside it (or under --out-dir; -o names the output of a
    single input). Directories are walked recursively, skipping files that already end in
    .qimem and symbolic links (unless --follow-symlinks). Outputs are written atomically,
    never overwrite anything without --force, and a failing file does not stop the others:
    each is named on stderr and the exit code is non-zero. With no FILES, standard input
    is encrypted to standard output.
    """
    if not files:
        _refuse_terminal_stdin(batch.ENCRYPT)
    if not files or files == ("-",):
        _stdio(state, batch.ENCRYPT, output, key_ref, aad, force, json_, context)
        return
    _files(
        state,
        batch.ENCRYPT,
        files,
        output,
        out_dir,
        jobs,
        key_ref,
        aad,
        force,
        quiet,
        json_,
        context,
        follow_symlinks,
    )


@click.command(cls=Command)
@_options
@pass_state
def decrypt(
    state: CliState,
    files: tuple[str, ...],
    output: str | None,
    out_dir: str | None,
    jobs: int,
    aad: str | None,
    context: str | None,
    force: bool,
    follow_symlinks: bool,
    quiet: bool,
    json_: bool,
) -> None:
    """Decrypt FILES and directories (or standard input); the key is found in each header.

    FILE.qimem becomes FILE (or goes under --out-dir; -o names the output of a single
    input). Directories are walked for *.qimem files (not following symbolic links unless
    --follow-symlinks). A file named .qimem, ..qimem or ...qimem has no safe output name:
    it fails alone. A file is written only if all of it
    authenticates. With no FILES, standard input is decrypted to standard output, where
    each segment is written once it has authenticated: check the exit status.
    """
    if not files:
        _refuse_terminal_stdin(batch.DECRYPT)
    if not files or files == ("-",):
        _stdio(state, batch.DECRYPT, output, None, aad, force, json_, context)
        return
    _files(
        state,
        batch.DECRYPT,
        files,
        output,
        out_dir,
        jobs,
        None,
        aad,
        force,
        quiet,
        json_,
        context,
        follow_symlinks,
    )


@click.command(cls=Command)
@click.argument("files", nargs=-1, required=True, type=click.Path())
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary line.")
@context_option
@follow_option
@json_option
@pass_state
def rewrap(
    state: CliState,
    files: tuple[str, ...],
    quiet: bool,
    context: str | None,
    follow_symlinks: bool,
    json_: bool,
) -> None:
    """Re-seal the data key of encrypted FILES under the newest version of their key.

    Only the header changes (the data itself is not re-encrypted); each file is replaced
    atomically. Directories are walked for *.qimem files (symbolic links are skipped unless
    --follow-symlinks; a followed link stays a link and the file it points to is
    rewrapped). Files already under the newest
    version are left alone. Prints one summary line, e.g. "rewrapped 3 files, 1 already
    current, 0 failed" (not with --quiet or --json).
    """
    tasks = batch.plan(files, batch.REWRAP, follow_symlinks=follow_symlinks)
    with _progress(quiet, tasks) as progress:
        result = batch.rewrap(
            state.backend, tasks, realm=state.realm, progress=progress, context=_aad(context)
        )
    if not json_ and not quiet:
        click.echo(rewrap_summary(result))
    _finish(result, json_)


def rewrap_summary(result: batch.BatchResult) -> str:
    """``rewrapped 3 files, 1 already current, 0 failed`` (and the symlinks skipped)."""
    changed = sum(1 for r in result.results if r.ok and r.changed)
    current = sum(1 for r in result.results if r.ok and not r.changed)
    failed = len(result.results) - changed - current
    line = (
        f"rewrapped {changed} file{'' if changed == 1 else 's'}, "
        f"{current} already current, {failed} failed"
    )
    if result.skipped:
        line += f", {len(result.skipped)} skipped"
    return line
