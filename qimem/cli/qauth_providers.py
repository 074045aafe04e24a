"""``qauth`` commands for a realm's login providers: ``realm providers``, ``realm
set-providers`` and ``user add-external`` (attached to their groups by
:mod:`qimem.cli.qauth`), and ``qauth login --jwt-file`` (:func:`jwt_login`). A provider's
``*_password_file`` option is read here, so a service password never appears on a command
line; nor does a JWT."""

from __future__ import annotations

import sys
from typing import Any

import click

from qimem.cli.context import echo_json, echo_result, json_option
from qimem.errors import ValidationError

realm_option = click.option("--realm", default="master", show_default=True, help="Realm to act on.")


def _provider_document(path: str) -> dict[str, Any]:
    """A realm's provider configuration from a JSON file (``-``: stdin). A provider's
    ``bind_password_file`` (or any ``*_password_file``) is read here and sent as
    ``bind_password``: secrets come from files, never from the command line."""
    from pathlib import Path

    from qimem.identity.providers import read_config_document

    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    document = read_config_document(text)
    if not isinstance(document, dict):
        raise ValidationError("the provider configuration must be a JSON object")
    for name, options in list(document.items()):
        if not isinstance(options, dict):
            continue
        for key in [k for k in options if k.endswith("_password_file")]:
            secret_path = options.pop(key)
            try:
                secret = Path(str(secret_path)).read_text("utf-8").splitlines()[0]
            except (OSError, UnicodeDecodeError, IndexError):
                raise ValidationError(
                    f"{name}.{key}: cannot read a password from {secret_path!r}"
                ) from None
            options[key.removesuffix("_file")] = secret
    return document


def _echo_mapping(mapping: dict[str, Any], indent: str) -> None:
    for group, roles in sorted(mapping.get("groups", {}).items()):
        click.echo(f"{indent}group {group} -> {', '.join(roles)}")
    for claim, values in sorted(mapping.get("claims", {}).items()):
        for value, roles in sorted(values.items()):
            click.echo(f"{indent}claim {claim}={value} -> {', '.join(roles)}")
    click.echo(f"{indent}default roles: {', '.join(mapping.get('default_roles', [])) or '-'}")
    click.echo(f"{indent}just-in-time users: {'on' if mapping.get('jit_users') else 'off'}")


def _echo_providers(json_: bool, shown: dict[str, Any], realm: str) -> None:
    if json_:
        echo_json(shown)
        return
    click.echo(f"realm {realm}: providers {', '.join(shown['providers'])}")
    for name in shown["providers"]:
        for key, value in sorted((shown.get(name) or {}).items()):
            if value is not None:
                click.echo(f"  {name}.{key} = {value}")
    if "mappings" not in shown:
        click.echo("  mapping (realm-wide, the same for every provider and issuer):")
        _echo_mapping(shown.get("mapping", {}), "    ")
        return
    for name, mapping in sorted(shown["mappings"].items()):
        click.echo(f"  mapping of {name}:")
        _echo_mapping(mapping, "    ")
        for issuer, own in sorted(mapping.get("issuers", {}).items()):
            click.echo(f"    issuer {issuer}:")
            _echo_mapping(own, "      ")


@click.command("providers")
@click.argument("name")
@json_option
@click.pass_obj
def realm_providers(state: Any, name: str, json_: bool) -> None:
    """Show realm NAME's login providers, their options (secrets as '(set)') and how
    external identities map to roles."""
    _echo_providers(json_, state.auth_backend.realm_providers(name), name)


@click.command("set-providers")
@click.argument("name")
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    help="JSON configuration ('-' for stdin); see docs/identity.md, 'Login providers'.",
)
@click.option("--reset", is_flag=True, help="Back to the password provider alone.")
@json_option
@click.pass_obj
def realm_set_providers(
    state: Any, name: str, config_file: str | None, reset: bool, json_: bool
) -> None:
    """Set realm NAME's login provider chain and role mapping (master admins only).

    A provider's 'bind_password_file' is read here and stored sealed under the root key.
    """
    if reset == (config_file is not None):
        raise ValidationError("give either --config FILE or --reset")
    document = None if reset else _provider_document(str(config_file))
    _echo_providers(json_, state.auth_backend.set_realm_providers(name, document), name)


@click.command("add-external")
@realm_option
@click.argument("username")
@click.option("--provider", required=True, help="The external login provider (e.g. ldap).")
@json_option
@click.pass_obj
def user_add_external(state: Any, realm: str, username: str, provider: str, json_: bool) -> None:
    """Provision USERNAME for an external login provider (no password; roles come from
    the realm's mapping at each login). Needed when just-in-time users are off."""
    created = state.auth_backend.add_external_user(realm, username, provider)
    echo_result(json_, created, f"user {username} added to realm {realm} for {provider}")


#: The longest JWT ``qauth login --jwt-file`` sends (the server's own limit is lower).
MAX_JWT = 64 * 1024


def jwt_login(backend: Any, realm: str, path: str) -> dict[str, Any]:
    """Swap the external JWT in file ``path`` ('-': stdin) for an access token of
    ``realm`` (the jwt-bearer grant), on a server (``--server``) or the local store."""
    from pathlib import Path
    from urllib.parse import quote

    try:
        text = sys.stdin.read(MAX_JWT + 1) if path == "-" else Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(
            f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    assertion = text.strip()
    if not assertion:
        raise ValidationError(f"no JWT in {path}")
    if len(assertion) > MAX_JWT:
        raise ValidationError(f"the JWT in {path} is too long")
    params = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}
    client = getattr(backend, "client", None)
    if client is not None:  # a server's token endpoint
        path_ = "/v1/auth/realms/" + quote(realm, safe="") + "/token"
        return dict(client.request("POST", path_, params, form=True, auth=False))
    from qimem.services import oidc

    return oidc.assertion_token(backend.app, realm, params)
