"""``qimem root split|recover``: K-of-N shares of the file provider's root key
(:mod:`qimem.root.escrow`). Attached to the ``qimem root`` group with :func:`register`.

Both commands work on local files only: they never open the store or contact a server.
Neither prints key bytes or share words; the passphrase is read from a file, never argv.
"""

from __future__ import annotations

from pathlib import Path

import click

from qimem.cli.context import CliState, Command, echo_json, json_option, pass_state
from qimem.errors import ConfigError, ConflictError, ValidationError

#: A passphrase file larger than this is refused unread.
_MAX_PASSPHRASE_FILE = 4096

_passphrase_file_option = click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False),
    help="Read a SLIP-39 passphrase from the first line of this file (default: none). "
    "Recovery then needs the passphrase as well as the shares.",
)


def register(group: click.Group) -> None:
    """Add ``split`` and ``recover`` to ``group`` (the ``qimem root`` group)."""
    group.add_command(split)
    group.add_command(recover)


def _read_passphrase(path: str | None) -> bytes:
    """The first line of ``path`` (without its line ending), or ``b""`` without a path."""
    if path is None:
        return b""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_PASSPHRASE_FILE + 1)
    except OSError as exc:
        raise ValidationError(
            f"cannot read passphrase file {path} ({type(exc).__name__})"
        ) from None
    if len(data) > _MAX_PASSPHRASE_FILE:
        raise ValidationError(f"passphrase file {path} is larger than {_MAX_PASSPHRASE_FILE} bytes")
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not line:
        raise ValidationError(f"passphrase file {path} is empty (omit --passphrase-file for none)")
    from qimem.root.escrow import check_passphrase

    check_passphrase(line)
    return line


def _root_key_file(state: CliState, explicit: str | None) -> Path:
    """The file provider's root key file: ``--root-key-file``, else the config's.

    :raises ConfigError: the store's root key is not a file (QIMEM_ROOT_KEY, or none
        configured).
    """
    if explicit:
        return Path(explicit)
    config = state.config()
    if config.root_key_b64:
        raise ConfigError(
            "the store's root key comes from QIMEM_ROOT_KEY, not a file; split escrows a "
            "root key file only (name one with --root-key-file)"
        )
    if config.root_key_provider not in (None, "file"):
        raise ConfigError(
            f"the store's root is held by the {config.root_key_provider} provider, not a "
            "root key file; split escrows a root key file only (its secret never leaves "
            "its provider: back that up the provider's way)"
        )
    if config.root_key_file is None:
        raise ConfigError(
            "no root key file is configured (the store's root is not a file key); split "
            "escrows the file provider's root key only"
        )
    return Path(config.root_key_file)


@click.command("split", cls=Command)
@click.option(
    "--shares",
    "-n",
    "shares",
    type=int,
    required=True,
    help="How many shares to write (2-16).",
)
@click.option(
    "--threshold",
    "-k",
    "threshold",
    type=int,
    required=True,
    help="How many shares rebuild the key (2-N).",
)
@click.option(
    "--out-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory for the share files (created 0700 if missing).",
)
@click.option(
    "--root-key-file",
    type=click.Path(dir_okay=False),
    help="The root key file to split (default: the config's [root_key] file).",
)
@_passphrase_file_option
@json_option
@pass_state
def split(
    state: CliState,
    shares: int,
    threshold: int,
    out_dir: str,
    root_key_file: str | None,
    passphrase_file: str | None,
    json_: bool,
) -> None:
    """Split the root key file into N shares, any K of which rebuild it.

    Writes one 0600 file per share (SLIP-39 words with a checksum, and a header naming the
    share, the threshold, the split's identifier and the root key's check value). Never
    overwrites a file. Hand each share to a different custodian.
    """
    from qimem.hardening import disable_core_dumps
    from qimem.root import escrow
    from qimem.rootkey import read_root_key_file

    escrow.check_limits(shares, threshold)  # before reading any secret
    passphrase = _read_passphrase(passphrase_file)
    disable_core_dumps()  # the root key is in this process
    key = read_root_key_file(_root_key_file(state, root_key_file))
    try:
        result = escrow.split_to_files(key, shares, threshold, Path(out_dir), passphrase)
    finally:
        key[:] = bytes(len(key))
    data = {
        "shares": result.shares,
        "threshold": result.threshold,
        "identifier": result.identifier,
        "check_value": result.check_value,
        "passphrase": bool(passphrase),
        "files": [str(p) for p in result.files],
    }
    if json_:
        echo_json(data)
    else:
        click.echo(
            f"wrote {result.shares} shares of the root key; any {result.threshold} rebuild it"
        )
        click.echo(f"  identifier:  {result.identifier}")
        click.echo(f"  check value: {result.check_value}")
        for path in result.files:
            click.echo(f"  {path}")
    if threshold == shares:
        click.echo(
            f"warning: threshold {threshold} of {shares}: losing any one share loses the key",
            err=True,
        )


@click.command("recover", cls=Command)
@click.argument("share_files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="New root key file to write (0600; an existing file is never replaced).",
)
@_passphrase_file_option
@json_option
def recover(
    share_files: tuple[str, ...], output: str, passphrase_file: str | None, json_: bool
) -> None:
    """Rebuild the root key file from any K share files (SHARE_FILE...).

    Refuses fewer than K shares, a share given twice, shares of different splits, a
    mistyped or edited share, and a rebuilt key whose check value differs from the one
    recorded at split time (a wrong passphrase). Prints the check value to compare with the
    one split printed.
    """
    from qimem.hardening import disable_core_dumps
    from qimem.root import escrow

    passphrase = _read_passphrase(passphrase_file)
    target = Path(output)
    if target.exists() or target.is_symlink():
        # before any share is read: an existing root key file is never replaced
        raise ConflictError(f"{target} exists; refusing to overwrite it")
    disable_core_dumps()  # the rebuilt root key is in this process
    key, first = escrow.recover_root_key([Path(p) for p in share_files], passphrase)
    try:
        escrow.write_recovered_key(target, key)
    finally:
        key[:] = bytes(len(key))
    data = {
        "path": str(target),
        "check_value": first.check_value,
        "identifier": first.identifier,
        "threshold": first.threshold,
        "shares_used": len(share_files),
    }
    if json_:
        echo_json(data)
    else:
        click.echo(f"rebuilt the root key from {len(share_files)} shares into {target}")
        click.echo(f"  identifier:  {first.identifier}")
        click.echo(f"  check value: {first.check_value} (matches the one the shares record)")
