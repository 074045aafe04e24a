"""The ``qauth`` CLI and ``qimem init``'s master realm, through CliRunner on real SQLite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from identity_helpers import ADMIN_PASSWORD

from qimem.app import AppContext
from qimem.cli import cli
from qimem.cli.qauth import qauth
from qimem.config import load_config
from qimem.services import identity as ids


def run(group, *args: str, input: str | None = None) -> Result:  # type: ignore[no-untyped-def]  # noqa: A002
    return CliRunner().invoke(group, list(args), input=input, catch_exceptions=False)


def ok(*args: str, input: str | None = None) -> Result:  # noqa: A002
    result = run(qauth, *args, input=input)
    assert result.exit_code == 0, (result.exit_code, result.stderr)
    return result


def js(*args: str, input: str | None = None) -> object:  # noqa: A002
    return json.loads(ok(*args, "--json", input=input).stdout)


def login(home: Path, realm: str, username: str, password: str) -> str:
    app = AppContext(load_config(home / "config.toml"))
    try:
        return ids.token(
            app, realm, {"grant_type": "password", "username": username, "password": password}
        ).access_token
    finally:
        ids.close_identity(app)
        app.close()


@pytest.fixture
def home(qimem_home: Path) -> Path:
    result = run(cli, "init", "--admin-password-stdin", "--json", input=ADMIN_PASSWORD + "\n")
    assert result.exit_code == 0, result.stderr
    assert "admin_password" not in json.loads(result.stdout)
    # Cheap Argon2 for the rest of the test (the config file's [identity] table).
    with (qimem_home / "config.toml").open("a") as fh:
        fh.write("\n[identity]\nargon2_memory_kib = 1024\nargon2_time_cost = 1\n")
    return qimem_home


def test_init_creates_master_admin_and_rerun_keeps_it(home: Path) -> None:
    assert login(home, "master", "admin", ADMIN_PASSWORD)
    again = run(cli, "init", "--admin-password-stdin", input="nabgure-password\n")
    assert again.exit_code == 0
    # Rerunning init never replaces the admin or its password.
    assert login(home, "master", "admin", ADMIN_PASSWORD)
    users = js("user", "list")
    assert [(u["username"], u["roles"]) for u in users] == [("admin", ["admin"])]


def test_init_without_password_generates_one_shown_once(qimem_home: Path) -> None:
    result = run(cli, "init", "--json")
    assert result.exit_code == 0, result.stderr
    generated = json.loads(result.stdout)["admin_password"]
    assert len(generated) >= 16
    assert login(qimem_home, "master", "admin", generated)
    rerun = json.loads(run(cli, "init", "--json").stdout)
    assert "admin_password" not in rerun


def test_realm_user_role_client_token_audit(home: Path) -> None:
    assert js("realm", "create", "acme")["name"] == "acme"
    assert [r["name"] for r in js("realm", "list")] == ["acme", "master"]
    user = js(
        "user",
        "add",
        "--realm",
        "acme",
        "alice",
        "--role",
        "encryptor",
        "--role",
        "auditor",
        "--password-stdin",
        input="nyvpr-password\n",
    )
    assert user["roles"] == ["auditor", "encryptor"] and "password" not in json.dumps(user)
    assert login(home, "acme", "alice", "nyvpr-password")

    role = js(
        "role",
        "create",
        "--realm",
        "acme",
        "payroll-enc",
        "-p",
        "crypto:encrypt",
        "-p",
        "crypto:decrypt",
    )
    assert role["permissions"] == ["crypto:encrypt", "crypto:decrypt"]
    granted = js("role", "grant", "--realm", "acme", "alice", "payroll-enc", "--scope", "payroll-*")
    assert granted["added"] is True
    listed = {r["name"]: r for r in js("role", "list", "--realm", "acme")}
    assert set(listed) == {"admin", "auditor", "encryptor", "key-manager", "payroll-enc"}
    js("role", "revoke", "--realm", "acme", "alice", "auditor")

    ok("user", "passwd", "--realm", "acme", "alice", "--password-stdin", input="nyvpr-new-pass\n")
    assert login(home, "acme", "alice", "nyvpr-new-pass")
    js("user", "disable", "--realm", "acme", "alice")
    users = {u["username"]: u for u in js("user", "list", "--realm", "acme")}
    assert users["alice"]["enabled"] is False
    js("user", "enable", "--realm", "acme", "alice")

    client = js("client", "create", "--realm", "acme", "batch", "--role", "encryptor")
    assert client["client_secret"].startswith("qcs_")
    token = ok("token", "--realm", "acme", "--user", "alice").stdout.strip()
    app = AppContext(load_config(home / "config.toml"))
    try:
        principal = ids.authenticate(app, token)
        assert principal.username == "alice" and principal.allows("crypto:encrypt", "payroll-1")
        assert not principal.allows("audit:read")
    finally:
        ids.close_identity(app)
        app.close()

    events = js("audit", "--realm", "acme", "--limit", "100")
    actions = {e["action"] for e in events}
    assert {
        "user.create",
        "role.create",
        "role.grant",
        "role.revoke",
        "user.password",
        "user.disable",
        "client.create",
        "token.issue",
        "login",
    } <= actions
    dumped = json.dumps(events)
    for secret in ("nyvpr-password", "nyvpr-new-pass", client["client_secret"], token):
        assert secret not in dumped
    table = ok("audit", "--realm", "acme").stdout
    assert "ACTION" in table and "role.grant" in table


def _error(result: Result, exit_code: int, fragment: str) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qauth: error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_errors_are_one_line_with_exit_codes(home: Path) -> None:
    _error(
        run(qauth, "user", "add", "--realm", "nope", "bob", "--password-stdin", input="x" * 10),
        5,
        "realm 'nope' does not exist",
    )
    _error(run(qauth, "realm", "delete", "master", "--yes"), 3, "cannot be deleted")
    _error(run(qauth, "realm", "create", "master"), 6, "already exists")
    _error(run(qauth, "user", "add", "carl", "--password-stdin", input="short\n"), 3, "password")
    _error(run(qauth, "role", "grant", "admin", "no-such-role"), 5, "no-such-role")
    _error(run(qauth, "role", "create", "r1", "-p", "keys:everything"), 3, "unknown permission")
    _error(run(qauth, "token", "--user", "ghost"), 5, "ghost")


def test_generated_user_password_is_shown_once(home: Path) -> None:
    made = js("user", "add", "bob", "--role", "auditor")
    assert login(home, "master", "bob", made["generated_password"])
    assert "generated_password" not in json.dumps(js("user", "list"))


def test_qauth_against_a_server(tmp_path: Path) -> None:
    """The same commands with --server URL and a bearer token go through /v1/auth."""
    from conftest import make_app
    from identity_helpers import serving, with_identity

    app = with_identity(make_app("memory://", None))
    try:
        with serving(app) as url:
            remote = ["--server", url]
            anonymous = run(qauth, *remote, "realm", "list")
            _error(anonymous, 4, "bearer")
            token = json.loads(
                ok(
                    *remote,
                    "token",
                    "--user",
                    "admin",
                    "--password-stdin",
                    "--json",
                    input=ADMIN_PASSWORD + "\n",
                ).stdout
            )["access_token"]
            remote += ["--token", token]
            assert js(*remote, "realm", "create", "acme")["name"] == "acme"
            assert "acme" in [r["name"] for r in js(*remote, "realm", "list")]
            js(
                *remote,
                "user",
                "add",
                "--realm",
                "acme",
                "bob",
                "--role",
                "encryptor",
                "--password-stdin",
                input="obo-password\n",
            )
            js(*remote, "role", "create", "--realm", "acme", "viewer", "-p", "keys:read")
            assert js(*remote, "role", "grant", "--realm", "acme", "bob", "viewer")["added"]
            js(*remote, "user", "disable", "--realm", "acme", "bob")
            users = {u["username"]: u for u in js(*remote, "user", "list", "--realm", "acme")}
            assert users["bob"]["enabled"] is False and users["bob"]["roles"] == [
                "encryptor",
                "viewer",
            ]
            js(*remote, "user", "enable", "--realm", "acme", "bob")
            ok(
                *remote,
                "user",
                "passwd",
                "--realm",
                "acme",
                "bob",
                "--password-stdin",
                input="obo-new-password\n",
            )
            bob = ok(
                "--server",
                url,
                "token",
                "--realm",
                "acme",
                "--user",
                "bob",
                "--password-stdin",
                input="obo-new-password\n",
            ).stdout.strip()
            assert ids.authenticate(app, bob).username == "bob"
            client = js(*remote, "client", "create", "--realm", "acme", "svc")
            assert client["client_secret"].startswith("qcs_")
            assert js(*remote, "rotate-signing-key", "--realm", "acme")["kid"]
            events = js(*remote, "audit", "--realm", "acme", "--action", "role.grant")
            assert [e["actor"] for e in events] == ["admin@master"]
            _error(run(qauth, *remote, "user", "list", "--realm", "nope"), 5, "nope")
    finally:
        ids.close_identity(app)
        app.close()
    _error(run(qauth, "--server", "http://127.0.0.1:9", "realm", "list"), 10, "cannot reach")
