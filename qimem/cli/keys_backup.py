"""``qimem keys export|import|backup|restore``: moving key material in and out of a store,
sealed under a passphrase (docs/keys.md)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from qimem.cli.context import (
    CliState,
    echo_json,
    json_option,
    pass_state,
)
from qimem.cli.keys_group import cli_actor, keys
from qimem.errors import ValidationError
from qimem.fileio import atomic_output


def _read_passphrase(from_stdin: bool, confirm: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    if not sys.stdin.isatty():
        raise ValidationError("no terminal to ask for the passphrase: use --passphrase-stdin")
    value: str = click.prompt(
        "Backup passphrase", hide_input=True, confirmation_prompt=confirm, err=True
    )
    return value


_passphrase_option = click.option(
    "--passphrase-stdin", is_flag=True, help="Read the passphrase from the first stdin line."
)


def _write(output: str, data: bytes, force: bool) -> None:
    with atomic_output(Path(output), force=force) as fh:
        fh.write(data)


@keys.command("export")
@click.argument("key", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@_passphrase_option
@pass_state
def keys_export(
    state: CliState, key: tuple[str, ...], output: str, force: bool, passphrase_stdin: bool
) -> None:
    """Back up keys (all versions, states, policy) to a passphrase-encrypted file.

    KEY is one or more key_ids, lineage_ids or names.
    """
    passphrase = _read_passphrase(passphrase_stdin, confirm=True)
    from qimem import backup  # Argon2: imported only when used

    data = backup.export_keys(state.app, key, passphrase, realm=state.realm, actor=cli_actor())
    _write(output, data, force)
    click.echo(f"exported {len(key)} key(s) to {output}", err=True)


@keys.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_passphrase_option
@json_option
@pass_state
def keys_import(state: CliState, file: str, passphrase_stdin: bool, json_: bool) -> None:
    """Restore the keys of an export FILE into the realm (ids are kept)."""
    passphrase = _read_passphrase(passphrase_stdin, confirm=False)
    from qimem import backup  # Argon2: imported only when used

    records = backup.import_keys(
        state.app, Path(file).read_bytes(), passphrase, realm=state.realm, actor=cli_actor()
    )
    _print_restored(records, json_)


def _print_restored(records: list[Any], json_: bool) -> None:
    rows = [
        {
            "lineage_id": r.lineage_id,
            "name": r.name,
            "realm": r.realm,
            "versions": len(r.versions),
        }
        for r in records
    ]
    if json_:
        echo_json(rows)
    else:
        for row in rows:
            click.echo(
                f"{row['realm']}/{row['name'] or row['lineage_id']}: {row['versions']} version(s)"
            )


@keys.command("backup")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="File.")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
@_passphrase_option
@pass_state
def keys_backup(state: CliState, output: str, force: bool, passphrase_stdin: bool) -> None:
    """Back up every key of every realm to a passphrase-encrypted file."""
    passphrase = _read_passphrase(passphrase_stdin, confirm=True)
    from qimem import backup  # Argon2: imported only when used

    data = backup.export_keys(state.app, None, passphrase, actor=cli_actor())
    _write(output, data, force)
    click.echo(f"backed up the key store to {output}", err=True)


@keys.command("restore")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@_passphrase_option
@json_option
@pass_state
def keys_restore(state: CliState, file: str, passphrase_stdin: bool, json_: bool) -> None:
    """Restore a whole-store backup FILE (every realm; nothing if any key exists)."""
    passphrase = _read_passphrase(passphrase_stdin, confirm=False)
    from qimem import backup  # Argon2: imported only when used

    records = backup.import_keys(state.app, Path(file).read_bytes(), passphrase, actor=cli_actor())
    _print_restored(records, json_)
