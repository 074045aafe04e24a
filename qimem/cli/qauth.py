"""The ``qauth`` command line: realms, users, roles, service accounts, tokens and the audit
log (DESIGN.md §7). A thin layer over :mod:`qimem.services.identity`, on the local store.

Working on the local store needs the config and root key, which is full control anyway, so
``qauth token`` mints a token for a user without their password.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from qimem.cli import QimemGroup
from qimem.cli.context import CliState, echo_json, echo_table, json_option, pass_state
from qimem.errors import ValidationError
from qimem.services import identity as ids


class QauthGroup(QimemGroup):
    prog = "qauth"


@click.group(cls=QauthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="QIMEM_CONFIG",
    help="Config file (default: the user config dir, or $QIMEM_HOME).",
)
@click.option("--store", "store_url", envvar="QIMEM_STORE", help="Store URL (overrides config).")
@click.version_option(package_name="qimem")
@click.pass_context
def qauth(ctx: click.Context, config_path: str | None, store_url: str | None) -> None:
    """qauth: realms, users, roles and tokens for qimem.

    Start with 'qimem init' (realm master, user admin), then for example
    'qauth realm create acme' and
    'qauth user add --realm acme alice --role encryptor --password-stdin'.
    """
    ctx.obj = CliState(config_path, store_url, [], "master")
    ctx.call_on_close(ctx.obj.close)


realm_option = click.option("--realm", default="master", show_default=True, help="Realm to act on.")


def _read_secret_stdin(what: str) -> str:
    data = sys.stdin.readline()
    value = data.rstrip("\r\n")
    if not value:
        raise ValidationError(f"no {what} on standard input")
    return value


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- realms ---------------------------------------------------------------------------


@qauth.group()
def realm() -> None:
    """Create, list and delete realms (tenants)."""


@realm.command("create")
@click.argument("name")
@json_option
@pass_state
def realm_create(state: CliState, name: str, json_: bool) -> None:
    """Create realm NAME with the built-in roles and its own signing key."""
    created = ids.create_realm(state.app, name)
    if json_:
        echo_json(created.to_dict())
    else:
        click.echo(f"realm {created.name} created")


@realm.command("list")
@json_option
@pass_state
def realm_list(state: CliState, json_: bool) -> None:
    """List realms."""
    found = ids.list_realms(state.app)
    if json_:
        echo_json([r.to_dict() for r in found])
    else:
        echo_table([[r.name, _when(r.created_at)] for r in found], ["REALM", "CREATED"])


@realm.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_state
def realm_delete(state: CliState, name: str, yes: bool, json_: bool) -> None:
    """Delete realm NAME and its users, roles and tokens (refused while it holds keys)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete realm {name} and all its users?", abort=True)
    ids.delete_realm(state.app, name)
    if json_:
        echo_json({"deleted": name})
    else:
        click.echo(f"realm {name} deleted")


# -- users ----------------------------------------------------------------------------


@qauth.group()
def user() -> None:
    """Add, list, disable and enable users; change passwords."""


@user.command("add")
@realm_option
@click.argument("username")
@click.option("--role", "roles", multiple=True, help="Role to grant (repeatable).")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@json_option
@pass_state
def user_add(
    state: CliState,
    realm: str,
    username: str,
    roles: tuple[str, ...],
    password_stdin: bool,
    json_: bool,
) -> None:
    """Add USERNAME to the realm with the given roles.

    Without --password-stdin a random password is generated and printed once.
    """
    from qimem.identity.passwords import generate_password

    generated = None
    if password_stdin:
        password = _read_secret_stdin("password")
    else:
        password = generated = generate_password()
    created = ids.add_user(state.app, realm, username, password, list(roles))
    if json_:
        body = created.to_dict()
        if generated:
            body["generated_password"] = generated
        echo_json(body)
        return
    click.echo(f"user {created.username} added to realm {realm}")
    if generated:
        click.echo(f"password (shown once): {generated}")


@user.command("list")
@realm_option
@json_option
@pass_state
def user_list(state: CliState, realm: str, json_: bool) -> None:
    """List the users and service accounts of the realm."""
    found = ids.list_users(state.app, realm)
    if json_:
        echo_json([u.to_dict() for u in found])
        return
    rows = []
    for u in found:
        d = u.to_dict()
        status = "disabled" if not u.enabled else ("locked" if d["locked"] else "enabled")
        grants = ",".join(r if s == "" else f"{r}@{s}" for r, s in u.grants) or "-"
        rows.append([u.username, u.kind, status, grants])
    echo_table(rows, ["USERNAME", "KIND", "STATUS", "ROLES"])


@user.command("passwd")
@realm_option
@click.argument("username")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@json_option
@pass_state
def user_passwd(
    state: CliState, realm: str, username: str, password_stdin: bool, json_: bool
) -> None:
    """Set USERNAME's password (clears a lockout and ends their sessions)."""
    if password_stdin:
        password = _read_secret_stdin("password")
    else:
        password = click.prompt("new password", hide_input=True, confirmation_prompt=True)
    ids.set_password(state.app, realm, username, password)
    if json_:
        echo_json({"username": username, "realm": realm, "password_changed": True})
    else:
        click.echo(f"password of {username} changed")


def _set_enabled(state: CliState, realm: str, username: str, enabled: bool, json_: bool) -> None:
    ids.set_user_enabled(state.app, realm, username, enabled)
    if json_:
        echo_json({"username": username, "realm": realm, "enabled": enabled})
    else:
        click.echo(f"user {username} {'enabled' if enabled else 'disabled'}")


@user.command("disable")
@realm_option
@click.argument("username")
@json_option
@pass_state
def user_disable(state: CliState, realm: str, username: str, json_: bool) -> None:
    """Disable USERNAME: no more logins; refresh tokens are revoked."""
    _set_enabled(state, realm, username, False, json_)


@user.command("enable")
@realm_option
@click.argument("username")
@json_option
@pass_state
def user_enable(state: CliState, realm: str, username: str, json_: bool) -> None:
    """Enable USERNAME again (also clears a lockout)."""
    _set_enabled(state, realm, username, True, json_)


# -- roles ----------------------------------------------------------------------------


@qauth.group()
def role() -> None:
    """Create and list roles; grant and revoke them."""


@role.command("create")
@realm_option
@click.argument("name")
@click.option(
    "--permission",
    "-p",
    "permissions",
    multiple=True,
    required=True,
    help="Permission such as crypto:encrypt (repeatable).",
)
@click.option("--description", default="", help="What the role is for.")
@json_option
@pass_state
def role_create(
    state: CliState,
    realm: str,
    name: str,
    permissions: tuple[str, ...],
    description: str,
    json_: bool,
) -> None:
    """Create a custom role NAME bundling permissions."""
    perms = [p for item in permissions for p in item.replace(",", " ").split()]
    created = ids.create_role(state.app, realm, name, perms, description)
    if json_:
        echo_json(created.to_dict())
    else:
        click.echo(f"role {created.name} created in realm {realm}")


@role.command("list")
@realm_option
@json_option
@pass_state
def role_list(state: CliState, realm: str, json_: bool) -> None:
    """List the realm's roles and their permissions."""
    found = ids.list_roles(state.app, realm)
    if json_:
        echo_json([r.to_dict() for r in found])
    else:
        echo_table(
            [[r.name, "yes" if r.builtin else "no", " ".join(r.permissions)] for r in found],
            ["ROLE", "BUILTIN", "PERMISSIONS"],
        )


_scope_option = click.option(
    "--scope", help="Only for keys whose name matches this pattern (e.g. 'payroll-*')."
)


@role.command("grant")
@realm_option
@click.argument("username")
@click.argument("role_name", metavar="ROLE")
@_scope_option
@json_option
@pass_state
def role_grant(
    state: CliState, realm: str, username: str, role_name: str, scope: str | None, json_: bool
) -> None:
    """Grant ROLE to USERNAME (a user or service account)."""
    added = ids.grant_role(state.app, realm, username, role_name, scope)
    if json_:
        echo_json({"username": username, "role": role_name, "scope": scope or "*", "added": added})
    else:
        click.echo(
            f"{username} {'now holds' if added else 'already holds'} {role_name}"
            + (f" on {scope}" if scope else "")
        )


@role.command("revoke")
@realm_option
@click.argument("username")
@click.argument("role_name", metavar="ROLE")
@_scope_option
@json_option
@pass_state
def role_revoke(
    state: CliState, realm: str, username: str, role_name: str, scope: str | None, json_: bool
) -> None:
    """Revoke ROLE from USERNAME (every scope unless --scope is given)."""
    ids.revoke_role(state.app, realm, username, role_name, scope)
    if json_:
        echo_json({"username": username, "role": role_name, "revoked": True})
    else:
        click.echo(f"{role_name} revoked from {username}")


# -- service accounts, tokens, audit ---------------------------------------------------


@qauth.group()
def client() -> None:
    """Service accounts (OAuth2 client_credentials)."""


@client.command("create")
@realm_option
@click.argument("client_id")
@click.option("--role", "roles", multiple=True, help="Role to grant (repeatable).")
@json_option
@pass_state
def client_create(
    state: CliState, realm: str, client_id: str, roles: tuple[str, ...], json_: bool
) -> None:
    """Create service account CLIENT_ID; its secret is printed once and never stored."""
    made = ids.create_client(state.app, realm, client_id, list(roles))
    if json_:
        echo_json({**made.user.to_dict(), "client_id": client_id, "client_secret": made.secret})
    else:
        click.echo(f"service account {client_id} created in realm {realm}")
        click.echo(f"client secret (shown once): {made.secret}")


@qauth.command("token")
@realm_option
@click.option("--user", "username", required=True, help="User or service account.")
@json_option
@pass_state
def token_cmd(state: CliState, realm: str, username: str, json_: bool) -> None:
    """Print an access token for USER (for scripts: QIMEM_TOKEN=$(qauth token ...))."""
    issued = ids.mint_token(state.app, realm, username)
    if json_:
        echo_json(issued.to_dict())
    else:
        click.echo(issued.access_token)


@qauth.command("rotate-signing-key")
@realm_option
@json_option
@pass_state
def rotate_signing_key(state: CliState, realm: str, json_: bool) -> None:
    """Start signing with a new key; the old one stays in the JWKS until its tokens expire."""
    kid = ids.rotate_signing_key(state.app, realm)
    if json_:
        echo_json({"realm": realm, "kid": kid})
    else:
        click.echo(kid)


@qauth.command("audit")
@realm_option
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--action", help="Only this action (e.g. login, role.grant).")
@click.option("--actor", help="Only this actor.")
@json_option
@pass_state
def audit_cmd(
    state: CliState,
    realm: str,
    limit: int,
    action: str | None,
    actor: str | None,
    json_: bool,
) -> None:
    """Show the realm's audit log, newest first."""
    found = ids.audit_events(state.app, realm, limit=limit, action=action, actor=actor)
    if json_:
        echo_json([r.to_dict() for r in found])
        return
    echo_table(
        [[_when(r.at), r.actor, r.action, r.target, r.outcome] for r in found],
        ["WHEN", "ACTOR", "ACTION", "TARGET", "OUTCOME"],
    )


def main() -> None:
    """Console entry point of ``qauth``."""
    qauth(prog_name="qauth")
