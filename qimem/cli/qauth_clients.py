"""``qauth client create|list|show|disable|enable|rotate-secret|delete`` (the ``client``
group, attached to ``qauth`` by :mod:`qimem.cli.qauth`), on the local store or, with
``--server``, through ``/v1/auth/realms/{realm}/clients``. A new secret is printed once, to
stdout or to a new 0600 file (``--secret-file``), never logged."""

from __future__ import annotations

import os
import sys
import urllib.parse
from typing import Any

import click

from qimem.cli.context import echo_json, echo_result, echo_table, json_option
from qimem.errors import ConflictError, ValidationError

realm_option = click.option("--realm", default="master", show_default=True, help="Realm to act on.")


class _Clients:
    """The operations on the local store or a server (JSON-ready results)."""

    def __init__(self, state: Any) -> None:
        from qimem.cli.qauth_backends import RemoteBackend

        backend = state.auth_backend
        self.remote = backend.client if isinstance(backend, RemoteBackend) else None
        self.app = None if self.remote is not None else backend.app

    def _path(self, realm: str, client_id: str = "", suffix: str = "") -> str:
        q = urllib.parse.quote
        item = "/" + q(client_id, safe="") if client_id else ""
        return f"/v1/auth/realms/{q(realm, safe='')}/clients{item}{suffix}"

    def list(self, realm: str) -> list[dict[str, Any]]:
        if self.remote is not None:
            return list(self.remote.request("GET", self._path(realm))["clients"])
        from qimem.services import clients

        return [u.to_dict() for u in clients.list_clients(self.app, realm)]  # type: ignore[arg-type]

    def show(self, realm: str, client_id: str) -> dict[str, Any]:
        if self.remote is not None:
            return dict(self.remote.request("GET", self._path(realm, client_id)))
        from qimem.services import clients

        return clients.show_client(self.app, realm, client_id)  # type: ignore[arg-type]

    def set_enabled(self, realm: str, client_id: str, enabled: bool) -> dict[str, Any]:
        if self.remote is not None:
            suffix = "/enable" if enabled else "/disable"
            return dict(self.remote.request("POST", self._path(realm, client_id, suffix)))
        from qimem.services import clients

        return clients.set_client_enabled(self.app, realm, client_id, enabled)  # type: ignore[arg-type]

    def rotate(self, realm: str, client_id: str, overlap: str | None) -> dict[str, Any]:
        from qimem.identity.clients import client_dict, parse_overlap

        seconds = parse_overlap(overlap)
        if self.remote is not None:
            path = self._path(realm, client_id, "/rotate-secret")
            return dict(self.remote.request("POST", path, {"overlap_seconds": seconds}))
        from qimem.services import clients

        made = clients.rotate_client_secret(self.app, realm, client_id, seconds)  # type: ignore[arg-type]
        return {**client_dict(made.user), "client_secret": made.secret}

    def delete(self, realm: str, client_id: str) -> None:
        if self.remote is not None:
            self.remote.request("DELETE", self._path(realm, client_id))
            return
        from qimem.services import clients

        clients.delete_client(self.app, realm, client_id)  # type: ignore[arg-type]


@click.group()
def client() -> None:
    """Service accounts (OAuth2 client_credentials)."""


@client.command("create")
@realm_option
@click.argument("client_id")
@click.option("--role", "roles", multiple=True, help="Role to grant (repeatable).")
@json_option
@click.pass_obj
def client_create(
    state: Any, realm: str, client_id: str, roles: tuple[str, ...], json_: bool
) -> None:
    """Create service account CLIENT_ID; its secret is printed once and never stored."""
    made = state.auth_backend.create_client(realm, client_id, list(roles))
    if json_:
        echo_json(made)
    else:
        click.echo(f"service account {client_id} created in realm {realm}")
        click.echo(f"client secret (shown once): {made['client_secret']}")


def _status(c: dict[str, Any]) -> str:
    return "disabled" if not c["enabled"] else ("locked" if c.get("locked") else "enabled")


@click.command("list")
@realm_option
@json_option
@click.pass_obj
def client_list(state: Any, realm: str, json_: bool) -> None:
    """List the realm's service accounts."""
    found = _Clients(state).list(realm)
    if json_:
        echo_json(found)
        return
    echo_table(
        [[c["username"], _status(c), ",".join(c["roles"]) or "-"] for c in found],
        ["CLIENT_ID", "STATUS", "ROLES"],
    )


@click.command("show")
@realm_option
@click.argument("client_id")
@json_option
@click.pass_obj
def client_show(state: Any, realm: str, client_id: str, json_: bool) -> None:
    """Show service account CLIENT_ID: status, roles, previous secrets still valid."""
    found = _Clients(state).show(realm, client_id)
    if json_:
        echo_json(found)
        return
    click.echo(f"service account {found['username']} in realm {found['realm']}: {_status(found)}")
    click.echo(f"  roles: {', '.join(found['roles']) or '-'}")
    for at in found.get("previous_secrets_expire", []):
        click.echo(f"  previous secret valid until {at}")


def _enabled(state: Any, realm: str, client_id: str, enabled: bool, json_: bool) -> None:
    shown = _Clients(state).set_enabled(realm, client_id, enabled)
    word = "enabled" if enabled else "disabled (its tokens no longer work)"
    echo_result(json_, shown, f"service account {client_id} {word}")


@click.command("disable")
@realm_option
@click.argument("client_id")
@json_option
@click.pass_obj
def client_disable(state: Any, realm: str, client_id: str, json_: bool) -> None:
    """Disable CLIENT_ID: no new tokens, and its tokens stop working at once."""
    _enabled(state, realm, client_id, False, json_)


@click.command("enable")
@realm_option
@click.argument("client_id")
@json_option
@click.pass_obj
def client_enable(state: Any, realm: str, client_id: str, json_: bool) -> None:
    """Enable CLIENT_ID again: new tokens, never the ones issued before it was disabled."""
    _enabled(state, realm, client_id, True, json_)


def _new_secret_file(path: str) -> int:
    """A NEW file at ``path``, mode 0600, opened for writing (an existing file or a symlink
    at ``path`` is refused, never followed or overwritten). Made before the rotation, so a
    path that cannot be used never costs the account its secret."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConflictError(f"{path} exists; the secret file must be new") from None
    except OSError as exc:
        raise ValidationError(f"cannot create {path}: {exc.strerror}") from None


def _write_secret_file(fd: int, secret: str) -> None:
    """``secret`` and a newline to the file :func:`_new_secret_file` opened."""
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(secret + "\n")
        out.flush()
        os.fsync(out.fileno())


@click.command("rotate-secret")
@realm_option
@click.argument("client_id")
@click.option(
    "--overlap",
    default="1h",
    show_default=True,
    help="How long the old secret keeps working (0, 90s, 15m, 1h, 2d; at most 30d). "
    "0 also ends the tokens it got.",
)
@click.option(
    "--secret-file",
    metavar="FILE",
    help="Write the new secret to this new file (mode 0600) instead of stdout.",
)
@json_option
@click.pass_obj
def client_rotate_secret(
    state: Any, realm: str, client_id: str, overlap: str, secret_file: str | None, json_: bool
) -> None:
    """Give CLIENT_ID a new secret (printed once); the old one works for --overlap."""
    fd = _new_secret_file(secret_file) if secret_file else None
    try:
        made = _Clients(state).rotate(realm, client_id, overlap)
    except BaseException:
        if fd is not None and secret_file:
            os.close(fd)
            os.unlink(secret_file)  # ours, still empty: the rotation did not happen
        raise
    secret = made.pop("client_secret")
    if fd is not None:
        _write_secret_file(fd, secret)
    elif json_:
        made["client_secret"] = secret
    if json_:
        echo_json(made)
        return
    click.echo(f"secret of service account {client_id} rotated (old one valid for {overlap})")
    if secret_file:
        click.echo(f"new client secret written to {secret_file}")
    else:
        click.echo(f"new client secret (shown once): {secret}")


@click.command("delete")
@realm_option
@click.argument("client_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@click.pass_obj
def client_delete(state: Any, realm: str, client_id: str, yes: bool, json_: bool) -> None:
    """Delete CLIENT_ID; its tokens stop working at once."""
    if not yes and sys.stdin.isatty():
        click.confirm(f"delete service account {client_id}?", abort=True)
    _Clients(state).delete(realm, client_id)
    echo_result(
        json_, {"deleted": client_id, "realm": realm}, f"service account {client_id} deleted"
    )


for _command in (
    client_list,
    client_show,
    client_disable,
    client_enable,
    client_rotate_secret,
    client_delete,
):
    client.add_command(_command)
