"""The ``qauth`` command line: realms, users, roles, service accounts, tokens and the audit
log (DESIGN.md §7). A thin layer over :mod:`qimem.services.identity`, on the local store.

Working on the local store needs the config and root key, which is full control anyway, so
``qauth token`` mints a token for a user without their password.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from qimem.cli import QimemGroup, qauth_clients, qauth_otp, qauth_providers
from qimem.cli.context import (
    CliState,
    ca_cert_option,
    config_option,
    echo_json,
    echo_result,
    echo_table,
    insecure_plain_http_option,
    json_option,
    store_option,
)
from qimem.cli.qauth_backends import Backend, LocalBackend, RemoteBackend
from qimem.errors import ValidationError


class QauthGroup(QimemGroup):
    prog = "qauth"


@click.group(cls=QauthGroup, context_settings={"help_option_names": ["-h", "--help"]})
@config_option
@store_option
@click.option(
    "--server",
    envvar="QIMEM_SERVER",
    help="Work against this qimem server (http://host:port) instead of the local store.",
)
@click.option(
    "--token",
    envvar="QIMEM_TOKEN",
    help="Bearer access token for --server (env QIMEM_TOKEN).",
)
@ca_cert_option
@insecure_plain_http_option
@click.version_option(package_name="qimem")
@click.pass_context
def qauth(
    ctx: click.Context,
    config_path: str | None,
    store_url: str | None,
    server: str | None,
    token: str | None,
    ca_cert: str | None,
    insecure_plain_http: bool,
) -> None:
    """qauth: realms, users, roles and tokens for qimem.

    Start with 'qimem init' (realm master, user admin), then for example
    'qauth realm create acme' and
    'qauth user add --realm acme alice --role encryptor --password-stdin'.
    With --server URL (and --token or QIMEM_TOKEN) the same commands go to a server.
    """
    state = QauthState(config_path, store_url, [], "master")
    state.server = server
    state.token = token
    state.ca_cert, state.insecure_plain_http = ca_cert or None, insecure_plain_http
    ctx.obj = state
    ctx.call_on_close(state.close)


class QauthState(CliState):
    """CLI state plus the backend: the local store, or a server (--server)."""

    server: str | None = None
    token: str | None = None
    _backend: Backend | None = None

    @property
    def auth_backend(self) -> Backend:
        if self._backend is None:
            if self.server:
                self._backend = RemoteBackend(self.http_client(self.token))
            else:
                self._backend = LocalBackend(self.app)
        return self._backend


pass_qauth = click.make_pass_decorator(QauthState)


realm_option = click.option("--realm", default="master", show_default=True, help="Realm to act on.")


def _read_secret_stdin(what: str) -> str:
    data = sys.stdin.readline()
    value = data.rstrip("\r\n")
    if not value:
        raise ValidationError(f"no {what} on standard input")
    return value


def _when(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


# -- realms ---------------------------------------------------------------------------


@qauth.group()
def realm() -> None:
    """Create, list and delete realms (tenants)."""


@realm.command("create")
@click.argument("name")
@json_option
@pass_qauth
def realm_create(state: QauthState, name: str, json_: bool) -> None:
    """Create realm NAME with the built-in roles and its own signing key."""
    created = state.auth_backend.create_realm(name)
    echo_result(json_, created, f"realm {created['name']} created")


@realm.command("list")
@json_option
@pass_qauth
def realm_list(state: QauthState, json_: bool) -> None:
    """List realms."""
    found = state.auth_backend.list_realms()
    if json_:
        echo_json(found)
    else:
        echo_table([[r["name"], _when(r["created_at"])] for r in found], ["REALM", "CREATED"])


@realm.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@pass_qauth
def realm_delete(state: QauthState, name: str, yes: bool, json_: bool) -> None:
    """Delete realm NAME and its users, roles and tokens (refused while it holds keys)."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete realm {name} and all its users?", abort=True)
    state.auth_backend.delete_realm(name)
    echo_result(json_, {"deleted": name}, f"realm {name} deleted")


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
@pass_qauth
def user_add(
    state: QauthState,
    realm: str,
    username: str,
    roles: tuple[str, ...],
    password_stdin: bool,
    json_: bool,
) -> None:
    """Add USERNAME to the realm with the given roles.

    Without --password-stdin a random password is generated and printed once.
    """
    from qimem.identity.password_policy import generate_password

    generated = None
    if password_stdin:
        password = _read_secret_stdin("password")
    else:
        policy = state.auth_backend.password_policy(realm)
        password = generated = generate_password(policy, username)
    created = state.auth_backend.add_user(realm, username, password, list(roles))
    if json_:
        body = dict(created)
        if generated:
            body["generated_password"] = generated
        echo_json(body)
        return
    click.echo(f"user {created['username']} added to realm {realm}")
    if generated:
        click.echo(f"password (shown once): {generated}")


@user.command("list")
@realm_option
@json_option
@pass_qauth
def user_list(state: QauthState, realm: str, json_: bool) -> None:
    """List the users and service accounts of the realm."""
    found = state.auth_backend.list_users(realm)
    if json_:
        echo_json(found)
        return
    rows = []
    for u in found:
        status = "disabled" if not u["enabled"] else ("locked" if u["locked"] else "enabled")
        grants = (
            ",".join(
                g["role"] if g["scope"] == "*" else f"{g['role']}@{g['scope']}" for g in u["grants"]
            )
            or "-"
        )
        rows.append([u["username"], u["kind"], status, grants])
    echo_table(rows, ["USERNAME", "KIND", "STATUS", "ROLES"])


@user.command("passwd")
@realm_option
@click.argument("username")
@click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
@json_option
@pass_qauth
def user_passwd(
    state: QauthState, realm: str, username: str, password_stdin: bool, json_: bool
) -> None:
    """Set USERNAME's password (clears a lockout and ends their sessions)."""
    if password_stdin:
        password = _read_secret_stdin("password")
    else:
        password = click.prompt("new password", hide_input=True, confirmation_prompt=True)
    state.auth_backend.set_password(realm, username, password)
    echo_result(
        json_,
        {"username": username, "realm": realm, "password_changed": True},
        f"password of {username} changed",
    )


def _set_enabled(state: QauthState, realm: str, username: str, enabled: bool, json_: bool) -> None:
    state.auth_backend.set_enabled(realm, username, enabled)
    echo_result(
        json_,
        {"username": username, "realm": realm, "enabled": enabled},
        f"user {username} {'enabled' if enabled else 'disabled'}",
    )


@user.command("disable")
@realm_option
@click.argument("username")
@json_option
@pass_qauth
def user_disable(state: QauthState, realm: str, username: str, json_: bool) -> None:
    """Disable USERNAME: no more logins; refresh tokens are revoked."""
    _set_enabled(state, realm, username, False, json_)


@user.command("enable")
@realm_option
@click.argument("username")
@json_option
@pass_qauth
def user_enable(state: QauthState, realm: str, username: str, json_: bool) -> None:
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
@pass_qauth
def role_create(
    state: QauthState,
    realm: str,
    name: str,
    permissions: tuple[str, ...],
    description: str,
    json_: bool,
) -> None:
    """Create a custom role NAME bundling permissions."""
    perms = [p for item in permissions for p in item.replace(",", " ").split()]
    created = state.auth_backend.create_role(realm, name, perms, description)
    echo_result(json_, created, f"role {created['name']} created in realm {realm}")


@role.command("list")
@realm_option
@json_option
@pass_qauth
def role_list(state: QauthState, realm: str, json_: bool) -> None:
    """List the realm's roles and their permissions."""
    found = state.auth_backend.list_roles(realm)
    if json_:
        echo_json(found)
    else:
        echo_table(
            [
                [r["name"], "yes" if r["builtin"] else "no", " ".join(r["permissions"])]
                for r in found
            ],
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
@pass_qauth
def role_grant(
    state: QauthState, realm: str, username: str, role_name: str, scope: str | None, json_: bool
) -> None:
    """Grant ROLE to USERNAME (a user or service account)."""
    added = state.auth_backend.grant(realm, username, role_name, scope)
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
@pass_qauth
def role_revoke(
    state: QauthState, realm: str, username: str, role_name: str, scope: str | None, json_: bool
) -> None:
    """Revoke ROLE from USERNAME (every scope unless --scope is given)."""
    state.auth_backend.revoke(realm, username, role_name, scope)
    echo_result(
        json_,
        {"username": username, "role": role_name, "revoked": True},
        f"{role_name} revoked from {username}",
    )


# -- service accounts, tokens, audit ---------------------------------------------------


@qauth.command("token")
@realm_option
@click.option("--user", "username", required=True, help="User or service account.")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Log in with the password on stdin (needed with --server; locally a token is "
    "minted without it).",
)
@json_option
@pass_qauth
def token_cmd(
    state: QauthState, realm: str, username: str, password_stdin: bool, json_: bool
) -> None:
    """Print an access token for USER (for scripts: QIMEM_TOKEN=$(qauth token ...))."""
    password = _read_secret_stdin("password") if password_stdin else None
    issued = state.auth_backend.token(realm, username, password)
    echo_result(json_, issued, issued["access_token"])


@qauth.command("login")
@realm_option
@click.option("--user", "username", help="Username (with --password-stdin).")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option(
    "--jwt-file",
    metavar="FILE",
    help="Log in with an external JWT read from FILE ('-': stdin) instead (the realm's "
    "jwt provider; docs/identity.md).",
)
@json_option
@pass_qauth
def login_cmd(
    state: QauthState,
    realm: str,
    username: str | None,
    password_stdin: bool,
    jwt_file: str | None,
    json_: bool,
) -> None:
    """Log in through the realm's login providers (password, LDAP, an external JWT ...)
    and print the access token."""
    if jwt_file is not None:
        if username or password_stdin:
            raise click.UsageError("--jwt-file goes without --user and --password-stdin")
        issued = qauth_providers.jwt_login(state.auth_backend, realm, jwt_file)
    elif username is None or not password_stdin:
        raise click.UsageError("give --user NAME --password-stdin, or --jwt-file FILE")
    else:
        password = _read_secret_stdin("password")
        otp = sys.stdin.readline().strip() or None  # a second line: the second-factor code
        issued = state.auth_backend.token(realm, username, password, otp)
    echo_result(json_, issued, issued["access_token"])


@qauth.command("rotate-signing-key")
@realm_option
@json_option
@pass_qauth
def rotate_signing_key(state: QauthState, realm: str, json_: bool) -> None:
    """Start signing with a new key; the old one stays in the JWKS until its tokens expire."""
    kid = state.auth_backend.rotate_signing_key(realm)
    echo_result(json_, {"realm": realm, "kid": kid}, kid)


@qauth.command("audit")
@realm_option
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 1000))
@click.option("--action", help="Only this action (e.g. login, role.grant).")
@click.option("--actor", help="Only this actor.")
@json_option
@pass_qauth
def audit_cmd(
    state: QauthState,
    realm: str,
    limit: int,
    action: str | None,
    actor: str | None,
    json_: bool,
) -> None:
    """Show the realm's audit log, newest first."""
    found = state.auth_backend.audit(realm, limit, action, actor)
    if json_:
        echo_json(found)
        return
    echo_table(
        [[_when(r["at"]), r["actor"], r["action"], r["target"], r["outcome"]] for r in found],
        ["WHEN", "ACTOR", "ACTION", "TARGET", "OUTCOME"],
    )


realm.add_command(qauth_providers.realm_providers)
realm.add_command(qauth_providers.realm_set_providers)
user.add_command(qauth_providers.user_add_external)
qauth.add_command(qauth_clients.client)
qauth.add_command(qauth_otp.otp)


def main() -> None:
    """Console entry point of ``qauth``."""
    qauth(prog_name="qauth")
