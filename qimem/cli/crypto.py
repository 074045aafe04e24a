"""``qimem encrypt`` and ``qimem decrypt`` for stdin/stdout and single files (envelope v1)."""

from __future__ import annotations

import base64
import binascii
import sys
from pathlib import Path
from typing import BinaryIO

import click

from qimem import services
from qimem.cli.context import CliState, echo_json, json_option, pass_state
from qimem.errors import PayloadTooLargeError, ValidationError
from qimem.fileio import atomic_output

SUFFIX = ".qimem"


def _read_limited(stream: BinaryIO, limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"{what} is over the envelope limit of {limit} bytes (limits.max_envelope_bytes)"
        )
    return data


def _read_input(source: str | None, limit: int) -> bytes:
    if source is None or source == "-":
        return _read_limited(sys.stdin.buffer, limit, "standard input")
    path = Path(source)
    try:
        with path.open("rb") as fh:
            return _read_limited(fh, limit, str(path))
    except FileNotFoundError:
        raise ValidationError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValidationError(f"{path} is a directory") from None
    except PermissionError:
        raise ValidationError(f"{path}: permission denied") from None


def _write_output(data: bytes, target: Path | None, force: bool) -> None:
    if target is None or str(target) == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    with atomic_output(target, force=force) as fh:
        fh.write(data)


def _aad(text: str | None) -> bytes | None:
    return text.encode("utf-8") if text else None


_common = [
    click.option(
        "-o", "--output", type=click.Path(dir_okay=False), help="Output file ('-': stdout)."
    ),
    click.option("--aad", help="Associated data (encryption context); needed again to decrypt."),
    click.option("--force", is_flag=True, help="Overwrite an existing output file."),
    click.option("--base64", "armor", is_flag=True, help="Envelope as base64 text."),
]


def _apply(options: list) -> callable:  # type: ignore[type-arg]
    def decorate(func):  # type: ignore[no-untyped-def]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@click.command()
@click.option("--key", "key_ref", required=True, help="Key name, lineage_id or active key_id.")
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@_apply(_common)
@json_option
@pass_state
def encrypt(
    state: CliState,
    key_ref: str,
    file: str | None,
    output: str | None,
    aad: str | None,
    force: bool,
    armor: bool,
    json_: bool,
) -> None:
    """Encrypt FILE (or standard input) under the active version of --key.

    Writes FILE.qimem next to FILE, or -o OUT, or standard output when reading standard
    input. Outputs are written atomically and never overwritten without --force.
    """
    app = state.app
    plaintext = _read_input(file, app.config.max_envelope_bytes)
    result = services.encrypt(app, key_ref, plaintext, aad=_aad(aad), realm=state.realm)
    data = base64.b64encode(result.envelope) + b"\n" if armor else result.envelope
    target = Path(output) if output else (Path(file + SUFFIX) if file and file != "-" else None)
    _write_output(data, target, force)
    if json_:
        echo_json(
            {
                "output": str(target) if target else "-",
                "key_id": result.key_id,
                "version": result.version,
                "bytes": len(plaintext),
            }
        )


@click.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False))
@_apply(_common)
@json_option
@pass_state
def decrypt(
    state: CliState,
    file: str | None,
    output: str | None,
    aad: str | None,
    force: bool,
    armor: bool,
    json_: bool,
) -> None:
    """Decrypt FILE (or standard input); the key is found from the envelope.

    FILE.qimem is written to FILE unless -o is given; standard input goes to standard
    output. Nothing is written unless the whole message authenticates.
    """
    app = state.app
    data = _read_input(file, app.config.max_envelope_bytes + 4096)
    if armor:
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("input is not valid base64") from None
    result = services.decrypt(app, data, aad=_aad(aad), realm=state.realm)
    if output:
        target: Path | None = Path(output)
    elif file and file != "-":
        if not file.endswith(SUFFIX):
            raise ValidationError(f"{file} does not end in {SUFFIX}; name the output with -o")
        target = Path(file[: -len(SUFFIX)])
    else:
        target = None
    _write_output(result.plaintext, target, force)
    if json_:
        echo_json(
            {
                "output": str(target) if target else "-",
                "key_id": result.key_id,
                "version": result.version,
                "bytes": len(result.plaintext),
            }
        )
