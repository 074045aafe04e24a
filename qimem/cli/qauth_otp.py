"""``qauth otp enroll|confirm|disable|status|require``: the second factor (TOTP) of password
users, on the local store or with ``--server`` through ``/v1/auth/realms/{realm}/users/
{username}/otp``. Codes are read from stdin (never from the command line); the secret and
the recovery codes are printed once."""

from __future__ import annotations

import sys
import urllib.parse
from typing import Any

import click

from qimem.cli.context import echo_json, echo_result, json_option
from qimem.errors import ValidationError

realm_option = click.option("--realm", default="master", show_default=True, help="Realm to act on.")


class _Otp:
    """The operations on the local store or a server (JSON-ready results)."""

    def __init__(self, state: Any) -> None:
        from qimem.cli.qauth_backends import RemoteBackend

        backend = state.auth_backend
        self.remote = backend.client if isinstance(backend, RemoteBackend) else None
        self.app = None if self.remote is not None else backend.app

    def _path(self, realm: str, username: str, suffix: str = "") -> str:
        q = urllib.parse.quote
        return f"/v1/auth/realms/{q(realm, safe='')}/users/{q(username, safe='')}/otp{suffix}"

    def status(self, realm: str, username: str) -> dict[str, Any]:
        if self.remote is not None:
            return dict(self.remote.request("GET", self._path(realm, username)))
        from qimem.services import otp

        return otp.otp_status(self.app, realm, username)  # type: ignore[arg-type]

    def enroll(self, realm: str, username: str, password: str | None) -> dict[str, Any]:
        if self.remote is not None:
            body = {"password": password} if password else None
            return dict(self.remote.request("POST", self._path(realm, username), body))
        from qimem.services import otp

        made = otp.otp_enroll(self.app, realm, username, password=password)  # type: ignore[arg-type]
        return made.to_dict()

    def confirm(self, realm: str, username: str, code: str) -> list[str]:
        if self.remote is not None:
            path = self._path(realm, username, "/confirm")
            return list(self.remote.request("POST", path, {"code": code})["recovery_codes"])
        from qimem.services import otp

        return otp.otp_confirm(self.app, realm, username, code)  # type: ignore[arg-type]

    def disable(self, realm: str, username: str, code: str | None) -> None:
        if self.remote is not None:
            body = {"code": code} if code else None
            self.remote.request("POST", self._path(realm, username, "/disable"), body)
            return
        from qimem.services import otp

        otp.otp_disable(self.app, realm, username, code)  # type: ignore[arg-type]

    def require(self, realm: str, required: bool) -> dict[str, Any]:
        if self.remote is not None:
            path = f"/v1/auth/realms/{urllib.parse.quote(realm, safe='')}/otp-policy"
            return dict(self.remote.request("PUT", path, {"required": required}))
        from qimem.services import otp

        return otp.set_otp_required(self.app, realm, required)  # type: ignore[arg-type]


def _read_password() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("current password", hide_input=True))
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValidationError("no password on standard input")
    return password


def _read_code() -> str:
    if sys.stdin.isatty():
        return str(click.prompt("code", hide_input=True)).strip()
    code = sys.stdin.readline().strip()
    if not code:
        raise ValidationError("no code on standard input")
    return code


@click.group()
def otp() -> None:
    """Second factor (TOTP) of password users: enroll, confirm, disable, status, and a
    realm's "required" policy."""


@otp.command("enroll")
@realm_option
@click.argument("username")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read your current password from stdin (needed to enroll your own).",
)
@json_option
@click.pass_obj
def otp_enroll(state: Any, realm: str, username: str, password_stdin: bool, json_: bool) -> None:
    """Enroll USERNAME: prints the secret and otpauth:// URI once; active after
    'qauth otp confirm' with a first code. Enrolling your own second factor (with your own
    token) needs your current password (--password-stdin); an administrator enrolling
    someone else does not."""
    made = _Otp(state).enroll(realm, username, _read_password() if password_stdin else None)
    if json_:
        echo_json(made)
        return
    click.echo(f"second factor of {username} enrolled (not active until confirmed)")
    click.echo(f"secret (shown once): {made['secret']}")
    click.echo(f"otpauth URI (shown once): {made['otpauth_uri']}")


@otp.command("confirm")
@realm_option
@click.argument("username")
@json_option
@click.pass_obj
def otp_confirm(state: Any, realm: str, username: str, json_: bool) -> None:
    """Activate USERNAME's enrolled secret with a first code (read from stdin); prints the
    10 single-use recovery codes once."""
    codes = _Otp(state).confirm(realm, username, _read_code())
    if json_:
        echo_json({"confirmed": True, "recovery_codes": codes})
        return
    click.echo(f"second factor of {username} active; recovery codes (shown once):")
    for code in codes:
        click.echo(f"  {code}")


@otp.command("disable")
@realm_option
@click.argument("username")
@click.option(
    "--code-stdin", is_flag=True, help="Read a current code from stdin (needed for your own)."
)
@json_option
@click.pass_obj
def otp_disable(state: Any, realm: str, username: str, code_stdin: bool, json_: bool) -> None:
    """Remove USERNAME's second factor (administrators; a user his own, with a code)."""
    _Otp(state).disable(realm, username, _read_code() if code_stdin else None)
    echo_result(json_, {"username": username, "otp": False}, f"second factor of {username} removed")


@otp.command("status")
@realm_option
@click.argument("username")
@json_option
@click.pass_obj
def otp_status(state: Any, realm: str, username: str, json_: bool) -> None:
    """Whether USERNAME has an active second factor, and recovery codes left."""
    found = _Otp(state).status(realm, username)
    if json_:
        echo_json(found)
        return
    state_text = "active" if found["confirmed"] else ("pending" if found["enrolled"] else "none")
    click.echo(
        f"{username}: second factor {state_text}, "
        f"{found['recovery_codes_left']} recovery codes left"
        + (" (required in this realm)" if found.get("required") else "")
    )


@otp.command("require")
@realm_option
@click.option("--off", is_flag=True, help="No longer require a second factor.")
@json_option
@click.pass_obj
def otp_require(state: Any, realm: str, off: bool, json_: bool) -> None:
    """Require a second factor of the realm's password users (realms:admin): a user
    without one is refused at login with otp_enrollment_required until enrolled."""
    shown = _Otp(state).require(realm, not off)
    word = "no longer requires" if off else "requires"
    echo_result(json_, shown, f"realm {realm} {word} a second factor")
