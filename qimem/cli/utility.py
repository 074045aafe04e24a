"""``qimem random`` and ``qimem hash``: random bytes and digests, no key involved
(docs/deterministic.md "Random bytes and hashes").

``hash`` always runs here (hashing needs no key, and :mod:`hashlib` here is the server's:
sending the data over would only expose it). ``random`` draws from this machine's CSPRNG,
or with ``--server`` from the server's (``POST /v1/security/random``, audited there as
``crypto.random``; for clients whose own entropy is not trusted, as with Vault's
``sys/tools/random``). No store is opened.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import BinaryIO

import click

from qimem.cli.context import CliState, Command
from qimem.errors import QimemError, ValidationError

_CHUNK = 1 << 20


def _encode(data: bytes, fmt: str) -> bytes:
    if fmt == "hex":
        return data.hex().encode("ascii") + b"\n"
    if fmt == "base64":
        return base64.b64encode(data) + b"\n"
    return data


def _os_error(exc: OSError, what: str, output: str | None = None) -> QimemError:
    from qimem.batch_plan import as_qimem_error  # imported on failure only

    return as_qimem_error(exc, what, output=output)


def _emit(data: bytes, output: str | None, force: bool) -> None:
    """``data`` to standard output, or atomically to a new 0600 file ``output``."""
    if output is None or output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    from qimem.fileio import atomic_output

    try:
        with atomic_output(Path(output), force=force, mode=0o600) as fh:
            fh.write(data)
    except OSError as exc:
        raise _os_error(exc, output, output) from None


_FORMATS = click.Choice(["base64", "hex", "raw"])


@click.command("random", cls=Command, context_settings={"ignore_unknown_options": True})
@click.argument("n", type=int)
@click.option(
    "--format",
    "fmt",
    type=_FORMATS,
    default="base64",
    show_default=True,
    help="Output encoding (raw: the bytes themselves; never to a terminal).",
)
@click.option("-o", "--output", help="Write to this new file (mode 0600) instead of stdout.")
@click.option("--force", is_flag=True, help="Overwrite the -o file if it exists.")
def random_(n: int, fmt: str, output: str | None, force: bool) -> None:
    """Print N random bytes from the operating system's CSPRNG (1 to 1048576).

    The bytes are base64 (default) or hex on one line, or raw with --format raw (to a
    file or a pipe, never to a terminal). With --server they come from the server's
    CSPRNG (POST /v1/security/random, audited there).
    """
    from qimem.services.randomness import check_size, generate

    check_size(n)  # a bad N fails before any output or request
    ctx = click.get_current_context(silent=True)
    state = ctx.find_object(CliState) if ctx is not None else None
    data = state.remote.random_bytes(n) if state is not None and state.server else generate(n)
    to_stdout = output is None or output == "-"
    if fmt == "raw" and to_stdout and sys.stdout.isatty():
        raise ValidationError(
            "refusing to write raw random bytes to a terminal; use -o, a pipe or --format"
        )
    _emit(_encode(data, fmt), output, force)


def _read_all(source: BinaryIO, algorithm: str) -> bytes:
    from qimem.services.randomness import hasher

    state = hasher(algorithm)
    while chunk := source.read(_CHUNK):
        state.update(chunk)
    return state.digest()


@click.command("hash", cls=Command)
@click.argument("file", required=False, type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "-a",
    "--algorithm",
    default="sha2-256",
    show_default=True,
    help="sha2-224, sha2-256, sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hex", "base64"]),
    default="hex",
    show_default=True,
    help="Output encoding of the digest.",
)
def hash_(file: str | None, algorithm: str, fmt: str) -> None:
    """Print the SHA-2 or SHA-3 digest of FILE (or standard input).

    Reads the input in chunks, so any size works; prints one line. Always computed
    locally, also with --server: a hash needs no key, so sending the data to a server
    would only expose it.
    """
    from qimem.services.randomness import check_algorithm

    check_algorithm(algorithm)  # a bad name fails before reading anything
    if file is None or file == "-":
        if file is None and sys.stdin is not None and sys.stdin.isatty():
            raise ValidationError(
                "no FILE given and standard input is a terminal; name the file to hash, "
                "or pipe data in (e.g. 'qimem hash < FILE')"
            )
        digest = _read_all(sys.stdin.buffer, algorithm)
    else:
        try:
            with open(file, "rb") as fh:
                digest = _read_all(fh, algorithm)
        except OSError as exc:
            raise _os_error(exc, file) from None
    sys.stdout.buffer.write(_encode(digest, fmt))
    sys.stdout.buffer.flush()
