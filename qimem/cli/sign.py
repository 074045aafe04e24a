"""``qimem sign``, ``verify``, ``mac`` and ``verify-mac``: signatures and MAC tags of a file
or standard input, with signing and MAC keys (docs/keys.md "Signing and MAC keys").

Signatures and tags are written in qimem's format (a header naming the key version, so they
verify after rotation; docs/formats.md) unless ``--raw``. Output files are written
atomically (no partial file on failure). ``verify`` and ``verify-mac`` print ``valid`` and
exit 0, or print ``invalid`` and exit 7; any other failure is one error line with its own
exit code.

With ``--server`` the server signs, verifies and computes tags (``/v1/security/sign`` ...,
:class:`qimem.remote.RemoteKeys`): the same output, formats and exit codes; the message
crosses the network (the keys do not), and the server audits the operation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qimem.cli.context import CliState, Command, echo_json, json_option, pass_state
from qimem.cli.keys_group import cli_actor
from qimem.errors import DecryptionError, PayloadTooLargeError, ValidationError

#: Exit code of an invalid signature or tag (the integrity class, as for decryption).
INVALID_EXIT = DecryptionError.exit_code
#: A signature or tag file longer than this is invalid unread (ML-DSA-65's signature is
#: 3309 bytes plus the 26-byte header).
MAX_SIGNATURE_FILE = 64 * 1024


def _read(path: str | None, limit: int, what: str) -> bytes:
    """The bytes of ``path`` (standard input for None or ``-``), at most ``limit``.

    :raises PayloadTooLargeError: more than ``limit`` bytes.
    """
    try:
        if path is None or path == "-":
            if sys.stdin is not None and sys.stdin.isatty():
                raise ValidationError(
                    f"no FILE given and standard input is a terminal; name the {what} file, "
                    "or pipe it in"
                )
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        from qimem.batch_plan import as_qimem_error

        raise as_qimem_error(exc, path or "-") from None
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"{path or 'standard input'} is over the limit of {limit} bytes"
            + ("; sign its digest instead (--prehashed)" if what == "message" else "")
        )
    return data


def _read_proof(path: str) -> bytes | None:
    """A signature or tag file; None when it is too long to be one (it is invalid)."""
    try:
        return _read(path, MAX_SIGNATURE_FILE, "signature")
    except PayloadTooLargeError:
        return None


def _write(data: bytes, output: str | None, force: bool, what: str) -> None:
    """``data`` to ``output`` atomically, or to standard output (not a terminal)."""
    if output is None or output == "-":
        if sys.stdout.isatty():
            raise ValidationError(
                f"refusing to write a binary {what} to a terminal; use -o FILE, a pipe or --json"
            )
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    from qimem.fileio import atomic_output

    with atomic_output(Path(output), force=force, mode=0o644) as fh:
        fh.write(data)


def _finish_verify(result: Any, json_: bool) -> None:
    if json_:
        echo_json(result.to_dict())
    else:
        click.echo("valid" if result.valid else "invalid")
    if not result.valid:
        raise click.exceptions.Exit(INVALID_EXIT)


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(
        [
            click.option("--key", "key_ref", required=True, help="Key name, lineage_id or key_id."),
            click.argument("file", required=False, type=click.Path(dir_okay=False)),
        ]
    ):
        func = option(func)
    return func


_output = click.option("-o", "--output", help="Output file ('-' or none: standard output).")
_force = click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
_raw = click.option(
    "--raw", is_flag=True, help="The algorithm's bare bytes, without qimem's version header."
)
_version = click.option(
    "--version",
    "version",
    type=click.IntRange(min=1),
    help="With --raw: the key version to check against (default: the active one).",
)
_prehashed = click.option(
    "--prehashed",
    is_flag=True,
    help="FILE is the digest of the message (ECDSA and RSA keys; SHA-256/384/512).",
)
_marshaling = click.option(
    "--marshaling",
    type=click.Choice(["asn1", "jws"]),
    default="asn1",
    show_default=True,
    help="ECDSA signature encoding: DER (asn1) or r||s (jws).",
)


def _limit(state: CliState) -> int:
    """The longest message read: the config's ``max_envelope_bytes`` (with --server, the
    client's config, if any; the server refuses what is over its own body limit, 413)."""
    if state.server:
        return state.config(required=False).max_envelope_bytes
    return state.app.config.max_envelope_bytes


@click.command(cls=Command)
@_common
@_output
@_force
@_raw
@_prehashed
@_marshaling
@json_option
@pass_state
def sign(
    state: CliState,
    key_ref: str,
    file: str | None,
    output: str | None,
    force: bool,
    raw: bool,
    prehashed: bool,
    marshaling: str,
    json_: bool,
) -> None:
    """Sign a file or standard input.

    The active version of signing key --key signs FILE (or standard input). The
    signature (binary) goes to -o SIG or standard output; with --json, standard output gets
    {"signature" (base64), "key_id", "version", "algorithm"} instead (and -o still gets the
    binary signature). It names the key version, so 'qimem verify' checks it after
    rotations; --raw writes the bare signature for other verifiers.
    """
    message = _read(file, _limit(state), "message")
    if state.server:
        try:
            result = state.remote.sign(
                key_ref, message, prehashed=prehashed, marshaling=marshaling, raw=raw
            )
        except PayloadTooLargeError as exc:  # the server's body limit (1 MiB by default)
            raise PayloadTooLargeError(
                f"{exc}; sign its digest instead (--prehashed, ECDSA and RSA keys)"
            ) from None
    else:
        from qimem.services import signing

        result = signing.sign(
            state.app,
            key_ref,
            message,
            realm=state.realm,
            prehashed=prehashed,
            marshaling=marshaling,
            raw=raw,
            actor=cli_actor(),
        )
    if json_:
        if output is not None and output != "-":
            _write(result.signature, output, force, "signature")
        echo_json(result.to_dict())
        return
    _write(result.signature, output, force, "signature")


@click.command(cls=Command)
@_common
@click.option("--signature", "signature_file", required=True, help="Signature file.")
@_raw
@_version
@_prehashed
@_marshaling
@json_option
@pass_state
def verify(
    state: CliState,
    key_ref: str,
    file: str | None,
    signature_file: str,
    raw: bool,
    version: int | None,
    prehashed: bool,
    marshaling: str,
    json_: bool,
) -> None:
    """Verify a signature: prints valid or invalid.

    Checks the signature in --signature of FILE (or standard input) by signing key --key.
    Prints "valid" (exit 0) or "invalid" (exit 7). A qimem signature names its key version
    (any version of --key that is not disabled or destroyed verifies); with --raw, the
    bare signature is checked against --version (default: the active version).
    """
    if version is not None and not raw:
        raise ValidationError("--version goes with --raw (a qimem signature names its version)")
    proof = _read_proof(signature_file)
    message = _read(file, _limit(state), "message")
    signature = b"" if proof is None else proof  # an over-long file is no signature
    options: dict[str, Any] = {"prehashed": prehashed, "marshaling": marshaling, "raw": raw}
    if state.server:
        result = state.remote.verify(key_ref, message, signature, version=version, **options)
    else:
        from qimem.services import signing

        result = signing.verify(
            state.app,
            key_ref,
            message,
            signature,
            realm=state.realm,
            version=version,
            actor=cli_actor(),
            **options,
        )
    _finish_verify(result, json_)


@click.command(cls=Command)
@_common
@_output
@_force
@_raw
@json_option
@pass_state
def mac(
    state: CliState,
    key_ref: str,
    file: str | None,
    output: str | None,
    force: bool,
    raw: bool,
    json_: bool,
) -> None:
    """Compute the MAC tag of a file or standard input.

    The active version of MAC key --key computes it. The tag (binary) goes to -o TAG or
    standard output; with --json, standard output gets {"tag" (base64), "key_id",
    "version", "algorithm"}. It names the key version, so 'qimem verify-mac' checks it
    after rotations; --raw writes the bare HMAC.
    """
    data = _read(file, _limit(state), "data")
    if state.server:
        result = state.remote.mac(key_ref, data, raw=raw)
    else:
        from qimem.services import macs

        result = macs.mac(state.app, key_ref, data, realm=state.realm, raw=raw, actor=cli_actor())
    if json_:
        if output is not None and output != "-":
            _write(result.tag, output, force, "tag")
        echo_json(result.to_dict())
        return
    _write(result.tag, output, force, "tag")


@click.command("verify-mac", cls=Command)
@_common
@click.option("--tag", "tag_file", required=True, help="Tag file.")
@_raw
@_version
@json_option
@pass_state
def verify_mac(
    state: CliState,
    key_ref: str,
    file: str | None,
    tag_file: str,
    raw: bool,
    version: int | None,
    json_: bool,
) -> None:
    """Verify a MAC tag: prints valid or invalid.

    Checks the tag in --tag of FILE (or standard input) with MAC key --key.
    Prints "valid" (exit 0) or "invalid" (exit 7); the comparison is constant-time. A
    qimem tag names its key version; with --raw, the bare tag is checked against --version
    (default: the active version).
    """
    if version is not None and not raw:
        raise ValidationError("--version goes with --raw (a qimem tag names its version)")
    proof = _read_proof(tag_file)
    data = _read(file, _limit(state), "data")
    tag = b"" if proof is None else proof  # an over-long file is no tag
    if state.server:
        result = state.remote.verify_mac(key_ref, data, tag, raw=raw, version=version)
    else:
        from qimem.services import macs

        result = macs.verify_mac(
            state.app,
            key_ref,
            data,
            tag,
            realm=state.realm,
            raw=raw,
            version=version,
            actor=cli_actor(),
        )
    _finish_verify(result, json_)
