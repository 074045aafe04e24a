"""``qimem keys create|list|show|rotate``."""

from __future__ import annotations

import click

from qimem import services
from qimem.cli.context import CliState, echo_json, echo_table, json_option, pass_state
from qimem.keys import KeyVersion


@click.group()
def keys() -> None:
    """Create, list, show and rotate keys."""


def _row(key: KeyVersion) -> list[str]:
    return [
        key.name or "-",
        key.lineage_id,
        str(key.version),
        key.key_id,
        key.algorithm,
        key.state.value,
        key.created_at.strftime("%Y-%m-%d %H:%M:%S"),
    ]


_HEADERS = ["NAME", "LINEAGE_ID", "VERSION", "KEY_ID", "ALGORITHM", "STATE", "CREATED"]


@keys.command("create")
@click.option("--algorithm", default="aes-256-gcm", show_default=True, help="AEAD algorithm.")
@click.option("--name", help="Unique name of the key in its realm.")
@json_option
@pass_state
def keys_create(state: CliState, algorithm: str, name: str | None, json_: bool) -> None:
    """Create a key (version 1, active) and print its key_id."""
    key = services.create_key(state.app, algorithm=algorithm, name=name, realm=state.realm)
    if json_:
        echo_json(key.to_dict())
    else:
        click.echo(key.key_id)


@keys.command("list")
@json_option
@pass_state
def keys_list(state: CliState, json_: bool) -> None:
    """List the keys of the realm, newest version of each."""
    found = services.list_keys(state.app, realm=state.realm)
    if json_:
        echo_json([k.to_dict() for k in found])
    elif found:
        echo_table([_row(k) for k in found], _HEADERS)


@keys.command("show")
@click.argument("key")
@json_option
@pass_state
def keys_show(state: CliState, key: str, json_: bool) -> None:
    """Show a key and all its versions. KEY is a key_id, lineage_id or name."""
    details = services.show_key(state.app, key, realm=state.realm)
    if json_:
        echo_json(details.to_dict())
        return
    click.echo(f"name:       {details.name or '-'}")
    click.echo(f"lineage_id: {details.lineage_id}")
    click.echo(f"realm:      {details.realm}")
    click.echo(f"algorithm:  {details.algorithm}")
    click.echo("")
    echo_table([_row(v) for v in details.versions], _HEADERS)


@keys.command("rotate")
@click.argument("key")
@json_option
@pass_state
def keys_rotate(state: CliState, key: str, json_: bool) -> None:
    """Rotate KEY: a new active version; the old one keeps decrypting.

    KEY is a key_id (which must be the active version) or a lineage_id or name (whose
    active version is rotated). Prints the new key_id.
    """
    rotated = services.rotate_key(state.app, key, realm=state.realm)
    if json_:
        echo_json(rotated.to_dict())
    else:
        click.echo(rotated.key_id)
