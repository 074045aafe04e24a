"""``qimem keys create|list|show|rotate``; the group's lifecycle commands (``policy``,
``disable``, ``enable``, ``destroy``, ``schedule-deletion``, ``cancel-deletion``, ``purge``)
are in :mod:`qimem.cli.keys_lifecycle`, ``export``, ``import``, ``backup`` and ``restore``
in :mod:`qimem.cli.keys_backup` (docs/keys.md)."""

from __future__ import annotations

import click

from qimem import services
from qimem.cli.context import (
    CliState,
    echo_json,
    echo_result,
    echo_table,
    json_option,
    pass_state,
)
from qimem.cli.keys_group import cli_actor, keys  # noqa: F401 - re-exported
from qimem.errors import ValidationError
from qimem.keys import KeyVersion
from qimem.services.keys import key_dict


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
@click.option(
    "--algorithm",
    default="aes-256-gcm",
    show_default=True,
    help="Algorithm: an AEAD (encryption), ed25519, ecdsa-p256 ... (signing), hmac-sha256 "
    "... (MAC), aes-256-siv (deterministic); 'qimem plugins list' names them all.",
)
@click.option(
    "--purpose",
    type=click.Choice(["encrypt", "sign", "mac", "deterministic"]),
    help="The key's purpose; must agree with --algorithm (which decides it).",
)
@click.option("--name", help="Unique name of the key in its realm.")
@click.option(
    "--derived",
    is_flag=True,
    help="A derived key: encryption needs a context, each context gets its own subkey.",
)
@json_option
@pass_state
def keys_create(
    state: CliState,
    algorithm: str,
    purpose: str | None,
    name: str | None,
    derived: bool,
    json_: bool,
) -> None:
    """Create a key (version 1, active) and print its key_id."""
    if state.server and (derived or purpose):
        raise ValidationError("--derived and --purpose are not available with --server yet")
    if state.server:
        key = state.remote.create_key(algorithm=algorithm, name=name)
        echo_result(json_, key.to_dict(), key.key_id)
        return
    # create_key refuses a realm qauth did not create (a typo is no new tenant)
    key = services.create_key(
        state.app,
        algorithm=algorithm,
        name=name,
        realm=state.realm,
        derived=derived,
        purpose=purpose,
        actor=cli_actor(),
    )
    echo_result(json_, key_dict(state.app, key), key.key_id)


@keys.command("list")
@json_option
@pass_state
def keys_list(state: CliState, json_: bool) -> None:
    """List the keys of the realm, newest version of each."""
    if state.server:
        found = state.remote.list_keys()
        rows = [k.to_dict() for k in found]
    else:
        found = services.list_keys(state.app, realm=state.realm)
        rows = [key_dict(state.app, k) for k in found]
    if json_:
        echo_json(rows)
    elif found:
        echo_table([_row(k) for k in found], _HEADERS)


@keys.command("show")
@click.argument("key")
@json_option
@pass_state
def keys_show(state: CliState, key: str, json_: bool) -> None:
    """Show a key and all its versions. KEY is a key_id, lineage_id or name."""
    if state.server:
        details = state.remote.show_key(key)
    else:
        details = services.show_key(state.app, key, realm=state.realm)
    if json_:
        echo_json(details.to_dict())
        return
    click.echo(f"name:       {details.name or '-'}")
    click.echo(f"lineage_id: {details.lineage_id}")
    click.echo(f"realm:      {details.realm}")
    click.echo(f"algorithm:  {details.algorithm}")
    click.echo(f"purpose:    {details.purpose}")
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
    if state.server:
        rotated = state.remote.rotate_key(key)
        echo_result(json_, rotated.to_dict(), rotated.key_id)
        return
    rotated = services.rotate_key(state.app, key, realm=state.realm, actor=cli_actor())
    echo_result(json_, key_dict(state.app, rotated), rotated.key_id)


@keys.command("public")
@click.argument("key")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["pem", "jwk", "jwks"]),
    default="pem",
    show_default=True,
    help="PEM (SubjectPublicKeyInfo), one JWK, or a JWKS of every version that verifies.",
)
@click.option("--version", "version", type=click.IntRange(min=1), help="Key version.")
@json_option
@pass_state
def keys_public(state: CliState, key: str, format_: str, version: int | None, json_: bool) -> None:
    """Print the public key of signing key KEY (never its private key).

    KEY is a name, lineage_id or key_id; the version is --version, else the one a key_id
    names, else the active one. --format jwks prints every version that still verifies
    (kid = key_id). --json prints key_id, version, algorithm, pem and jwk. With --server,
    the server's public key (GET /v1/security/keys/KEY/public), printed the same way.
    """
    from qimem.services import signing

    if format_ == "jwks":
        if version is not None:
            raise ValidationError("--format jwks lists every version; leave out --version")
        if state.server:
            found = state.remote.public_keys(key)
        else:
            found = signing.public_keys(state.app, key, realm=state.realm)
        if json_:
            echo_json([item.to_dict() for item in found])
        else:
            echo_json({"keys": [item.jwk for item in found]})
        return
    if state.server:
        result = state.remote.public_key(key, version=version)
    else:
        result = signing.public_key(state.app, key, realm=state.realm, version=version)
    if json_:
        echo_json(result.to_dict())
    elif format_ == "jwk":
        echo_json(result.jwk)
    else:
        click.echo(result.pem, nl=False)


# The other subcommands of the group, by concern (they register on ``keys`` when imported).
from qimem.cli import keys_backup, keys_lifecycle  # noqa: E402, F401
