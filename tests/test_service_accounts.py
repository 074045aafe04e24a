"""Issue 15 item 5: the service-account lifecycle (list, show, disable, enable,
rotate-secret with an overlap, delete) over the services, ``qauth client ...`` and HTTP, and
its attacks: escalation, another realm, a client acting on itself, forged and expired
previous secrets, a disabled or deleted client's token, concurrent rotations."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import (
    ADMIN_PASSWORD,
    STORES,
    close_app,
    identity_app,
    password_login,
    raw_sql,
    serving,
    store_url,
    with_identity,
)

from qimem.app import AppContext
from qimem.errors import AuthError, ForbiddenError, NotFoundError, ValidationError
from qimem.identity.escalation import EscalationError
from qimem.services import clients as cs
from qimem.services import identity as ids

PW = "steady-copper-orchard-7"
A = "/v1/auth/realms"


def client_token(app: AppContext, realm: str, client_id: str, secret: str) -> str:
    params = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    return ids.token(app, realm, params).access_token


def refused(app: AppContext, realm: str, client_id: str, secret: str) -> bool:
    try:
        client_token(app, realm, client_id, secret)
    except AuthError as exc:
        assert exc.code == "invalid_client"
        return True
    return False


def token_works(app: AppContext, token: str) -> bool:
    try:
        ids.authenticate(app, token)
    except AuthError:
        return False
    return True


@pytest.fixture(params=STORES)
def app(request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str) -> Iterator[AppContext]:
    made = identity_app(store_url(request, tmp_path, request.param), root_key_b64)
    ids.create_realm(made, "acme")
    yield made
    close_app(made)


# -- the lifecycle on real databases ----------------------------------------------------


def test_lifecycle_disable_enable_delete(app: AppContext) -> None:
    made = ids.create_client(app, "acme", "svc", ["encryptor"])
    assert [c.username for c in cs.list_clients(app, "acme")] == ["svc"]
    shown = cs.show_client(app, "acme", "svc")
    assert shown["client_id"] == "svc" and shown["roles"] == ["encryptor"]
    assert shown["previous_secrets_expire"] == [] and made.secret not in json.dumps(shown)
    old = client_token(app, "acme", "svc", made.secret)
    assert token_works(app, old)

    assert cs.set_client_enabled(app, "acme", "svc", False)["enabled"] is False
    assert not token_works(app, old)  # at once, on this server
    assert refused(app, "acme", "svc", made.secret)

    cs.set_client_enabled(app, "acme", "svc", True)
    new = client_token(app, "acme", "svc", made.secret)
    assert token_works(app, new) and not token_works(app, old)  # new tokens, never the old

    cs.delete_client(app, "acme", "svc")
    assert not token_works(app, new)
    assert refused(app, "acme", "svc", made.secret)
    assert cs.list_clients(app, "acme") == []
    assert "svc" not in [u.username for u in ids.list_users(app, "acme")]
    with pytest.raises(NotFoundError):
        cs.show_client(app, "acme", "svc")
    again = ids.create_client(app, "acme", "svc", [])  # the name is free again
    assert token_works(app, client_token(app, "acme", "svc", again.secret))
    assert not token_works(app, new)


def test_rotation_overlap(app: AppContext) -> None:
    made = ids.create_client(app, "acme", "svc", ["encryptor"])
    before = client_token(app, "acme", "svc", made.secret)
    rotated = cs.rotate_client_secret(app, "acme", "svc", "1s")
    assert rotated.secret != made.secret
    assert not refused(app, "acme", "svc", made.secret)  # within the overlap
    assert not refused(app, "acme", "svc", rotated.secret)
    assert token_works(app, before)  # a graceful rotation keeps the tokens
    assert len(cs.show_client(app, "acme", "svc")["previous_secrets_expire"]) == 1
    time.sleep(1.1)
    assert refused(app, "acme", "svc", made.secret)  # after the overlap
    assert not refused(app, "acme", "svc", rotated.secret)
    assert cs.show_client(app, "acme", "svc")["previous_secrets_expire"] == []


def test_rotation_overlap_zero_is_immediate_and_cuts_tokens(app: AppContext) -> None:
    made = ids.create_client(app, "acme", "svc", ["encryptor"])
    first = cs.rotate_client_secret(app, "acme", "svc", "1h")  # made.secret still valid
    token = client_token(app, "acme", "svc", first.secret)
    last = cs.rotate_client_secret(app, "acme", "svc", 0)
    assert refused(app, "acme", "svc", made.secret)
    assert refused(app, "acme", "svc", first.secret)
    assert not token_works(app, token)
    assert not refused(app, "acme", "svc", last.secret)


def test_rotation_keeps_earlier_overlaps(app: AppContext) -> None:
    made = ids.create_client(app, "acme", "svc", [])
    one = cs.rotate_client_secret(app, "acme", "svc", "1h")
    two = cs.rotate_client_secret(app, "acme", "svc", "1h")
    for secret in (made.secret, one.secret, two.secret):
        assert not refused(app, "acme", "svc", secret)


def test_forged_previous_secret_row_is_refused(
    app: AppContext, request: pytest.FixtureRequest
) -> None:
    """A database writer without the root key adds a previous secret of his own, or moves
    a genuine row's expiry forward: neither opens the account."""
    from qimem.identity.passwords import hash_client_secret

    made = ids.create_client(app, "acme", "svc", [])
    victim = ids.identity(app).get_user("acme", "svc")
    url = app.settings.store_url
    raw_sql(
        url,
        "INSERT INTO qimem_client_secrets (secret_id, user_id, realm, secret_hash, expires_at, "
        "mac) VALUES ('x1', :u, 'acme', :h, :e, :m)",
        u=victim.user_id,
        h=hash_client_secret("attacker-secret"),
        e=time.time() + 3600,
        m="0" * 64,
    )
    assert refused(app, "acme", "svc", "attacker-secret")
    cs.rotate_client_secret(app, "acme", "svc", "1s")
    raw_sql(url, "UPDATE qimem_client_secrets SET expires_at = :e", e=time.time() + 9e6)
    assert refused(app, "acme", "svc", made.secret)  # its MAC binds the expiry


def test_bad_overlaps_and_names(app: AppContext) -> None:
    ids.create_client(app, "acme", "svc", [])
    ids.add_user(app, "acme", "alice", PW, [])
    for bad in ("-1s", "31d", "1w", "h", "1.5h", "", "9999999999"):
        with pytest.raises(ValidationError):
            cs.rotate_client_secret(app, "acme", "svc", bad)
    with pytest.raises(NotFoundError) as err:
        cs.delete_client(app, "acme", "alice")  # a user is not a service account
    assert err.value.code == "client_not_found"
    assert ids.identity(app).get_user("acme", "alice").enabled
    with pytest.raises(NotFoundError):
        cs.rotate_client_secret(app, "nowhere", "svc")


@pytest.mark.parametrize("overlap", ["1h", "0"])
def test_concurrent_rotations_leave_a_working_secret(app: AppContext, overlap: str) -> None:
    """Two rotations at once serialize on the row lock: the current secret is one of the
    two returned, and with an overlap every secret handed out still works."""
    made = ids.create_client(app, "acme", "svc", [])
    results: list[Any] = []
    gate = threading.Barrier(4)

    def rotate() -> None:
        gate.wait()
        try:
            results.append(cs.rotate_client_secret(app, "acme", "svc", overlap))
        except Exception as exc:  # noqa: BLE001 (recorded and asserted below)
            results.append(exc)

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    secrets = [r.secret for r in results if not isinstance(r, Exception)]
    assert len(results) == 4 and len(secrets) >= 1, results
    working = [s for s in [made.secret, *secrets] if not refused(app, "acme", "svc", s)]
    assert working, "no secret opens the account"
    if overlap == "1h":  # each rotation kept the ones before: all five secrets open it
        assert len(secrets) == 4 and set(working) == {made.secret, *secrets}
    else:  # each rotation dropped the ones before: only the last one's secret
        assert len(working) == 1 and working[0] in secrets


def test_secret_never_in_audit(app: AppContext) -> None:
    made = ids.create_client(app, "acme", "svc", [])
    rotated = cs.rotate_client_secret(app, "acme", "svc", "1h")
    records = ids.audit_events(app, "acme", limit=50)
    text = json.dumps([r.to_dict() for r in records])
    assert "client.rotate_secret" in text
    assert made.secret not in text and rotated.secret not in text
    assert rotated.secret not in repr(rotated)


# -- permissions: services --------------------------------------------------------------


@pytest.fixture
def world() -> Iterator[AppContext]:
    made = with_identity(make_app("memory://", None))
    for realm in ("acme", "beta"):
        ids.create_realm(made, realm)
    ids.create_role(made, "acme", "helpdesk", ["users:admin"], "")
    ids.add_user(made, "acme", "helpdesk", PW, ["helpdesk"])
    ids.add_user(made, "acme", "keymgr", PW, ["key-manager"])
    ids.add_user(made, "beta", "intruder", PW, ["admin"])
    yield made
    close_app(made)


def principal(app: AppContext, realm: str, user: str, password: str = PW) -> Any:
    return ids.authenticate(app, password_login(app, realm, user, password).access_token)


def test_no_escalation_on_clients(world: AppContext) -> None:
    strong = ids.create_client(world, "acme", "strong", ["admin"])
    ids.create_client(world, "acme", "weak", [])
    helpdesk = principal(world, "acme", "helpdesk")
    for attempt in (
        lambda: cs.rotate_client_secret(world, "acme", "strong", "0", principal=helpdesk),
        lambda: cs.set_client_enabled(world, "acme", "strong", False, principal=helpdesk),
        lambda: cs.delete_client(world, "acme", "strong", principal=helpdesk),
    ):
        with pytest.raises(EscalationError):
            attempt()
    assert not refused(world, "acme", "strong", strong.secret)  # untouched
    assert cs.show_client(world, "acme", "strong")["enabled"]
    denied = ids.audit_events(world, "acme", limit=20, actor="helpdesk@acme")
    assert {(r.action, r.outcome) for r in denied} >= {
        ("client.rotate_secret", "denied"),
        ("client.disable", "denied"),
        ("client.delete", "denied"),
    }
    # on an account holding nothing more, the helpdesk is served
    cs.rotate_client_secret(world, "acme", "weak", "0", principal=helpdesk)
    cs.set_client_enabled(world, "acme", "weak", False, principal=helpdesk)
    cs.delete_client(world, "acme", "weak", principal=helpdesk)


def test_other_realm_and_missing_permission(world: AppContext) -> None:
    ids.create_client(world, "acme", "svc", [])
    intruder = principal(world, "beta", "intruder")
    keymgr = principal(world, "acme", "keymgr")
    for call in (cs.delete_client, cs.rotate_client_secret, cs.show_client):
        with pytest.raises(NotFoundError):
            call(world, "acme", "svc", principal=intruder)
        with pytest.raises(ForbiddenError):
            call(world, "acme", "svc", principal=keymgr)
    with pytest.raises(NotFoundError):
        cs.list_clients(world, "acme", principal=intruder)
    assert cs.show_client(world, "acme", "svc")["enabled"]


def test_client_acting_on_itself(world: AppContext) -> None:
    """Decided (docs/identity.md): no special case. Without users:admin a service account
    cannot rotate its own secret; with it, it can (it holds nothing it lacks)."""
    plain = ids.create_client(world, "acme", "plain", ["encryptor"])
    me = ids.authenticate(world, client_token(world, "acme", "plain", plain.secret))
    with pytest.raises(ForbiddenError):
        cs.rotate_client_secret(world, "acme", "plain", principal=me)
    ops = ids.create_client(world, "acme", "ops", ["helpdesk"])
    me = ids.authenticate(world, client_token(world, "acme", "ops", ops.secret))
    rotated = cs.rotate_client_secret(world, "acme", "ops", "1h", principal=me)
    assert not refused(world, "acme", "ops", ops.secret)
    assert not refused(world, "acme", "ops", rotated.secret)


# -- HTTP and qauth --server --------------------------------------------------------------


def test_http_and_cli_lifecycle(world: AppContext, tmp_path: Path) -> None:
    strong = ids.create_client(world, "acme", "strong", ["admin"])
    admin = password_login(world, "master", "admin", ADMIN_PASSWORD).access_token
    helpdesk = password_login(world, "acme", "helpdesk", PW).access_token
    intruder = password_login(world, "beta", "intruder", PW).access_token
    with serving(world) as url:

        def http(token: str, method: str, path: str, body: Any = None) -> requests.Response:
            headers = {"Authorization": f"Bearer {token}"}
            return requests.request(method, url + path, json=body, headers=headers, timeout=10)

        def qauth(token: str, *args: str) -> Any:
            from qimem.cli.qauth import qauth as cli

            argv = ["--server", url, "--token", token, *args]
            return CliRunner().invoke(cli, argv, catch_exceptions=False)

        made = http(helpdesk, "POST", f"{A}/acme/clients", {"client_id": "svc"})
        assert made.status_code == 201
        secret = made.json()["client_secret"]
        listed = http(helpdesk, "GET", f"{A}/acme/clients").json()["clients"]
        assert sorted(c["client_id"] for c in listed) == ["strong", "svc"]
        assert http(helpdesk, "GET", f"{A}/acme/clients/svc").json()["enabled"] is True

        rotated = http(
            helpdesk, "POST", f"{A}/acme/clients/svc/rotate-secret", {"overlap_seconds": 0}
        )
        assert rotated.status_code == 200 and rotated.headers["Cache-Control"] == "no-store"
        new_secret = rotated.json()["client_secret"]
        assert refused(world, "acme", "svc", secret) and not refused(
            world, "acme", "svc", new_secret
        )
        assert http(helpdesk, "POST", f"{A}/acme/clients/svc/rotate-secret").status_code == 200
        bad = http(helpdesk, "POST", f"{A}/acme/clients/svc/rotate-secret", {"overlap_seconds": -1})
        assert bad.status_code == 400

        # a disabled client's token is refused at once
        svc_secret = http(helpdesk, "POST", f"{A}/acme/clients/svc/rotate-secret").json()[
            "client_secret"
        ]
        token = client_token(world, "acme", "svc", svc_secret)
        assert http(token, "GET", "/v1/security/keys").status_code == 403  # valid, no permission
        assert http(helpdesk, "POST", f"{A}/acme/clients/svc/disable").json()["enabled"] is False
        assert http(token, "GET", "/v1/security/keys").status_code == 401
        assert http(helpdesk, "POST", f"{A}/acme/clients/svc/enable").json()["enabled"] is True
        assert http(token, "GET", "/v1/security/keys").status_code == 401

        # escalation, another realm, unknown
        for method, suffix in (("POST", "/disable"), ("POST", "/rotate-secret"), ("DELETE", "")):
            answer = http(helpdesk, method, f"{A}/acme/clients/strong{suffix}")
            assert answer.status_code == 403, answer.text
            assert answer.json()["error"]["code"] == "escalation_denied"
            assert http(intruder, method, f"{A}/acme/clients/svc{suffix}").status_code == 404
        assert http(helpdesk, "GET", f"{A}/acme/clients/nobody").status_code == 404
        assert not refused(world, "acme", "strong", strong.secret)

        # qauth --server
        shown = qauth(helpdesk, "client", "list", "--realm", "acme", "--json")
        assert shown.exit_code == 0 and "svc" in shown.output
        secret_file = tmp_path / "svc.secret"
        done = qauth(
            helpdesk, "client", "rotate-secret", "--realm", "acme", "svc",
            "--overlap", "15m", "--secret-file", str(secret_file),
        )  # fmt: skip
        assert done.exit_code == 0, done.output
        stored = secret_file.read_text().strip()
        assert stored not in done.output
        assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
        assert not refused(world, "acme", "svc", stored)
        again = qauth(
            helpdesk, "client", "rotate-secret", "--realm", "acme", "svc",
            "--secret-file", str(secret_file),
        )  # fmt: skip
        assert again.exit_code != 0 and "exists" in again.output  # and nothing rotated
        denied = qauth(helpdesk, "client", "disable", "--realm", "acme", "strong")
        assert denied.exit_code == 4 and "no escalation" in denied.output
        gone = qauth(admin, "client", "delete", "--realm", "acme", "svc", "--yes", "--json")
        assert gone.exit_code == 0, gone.output
        assert http(helpdesk, "GET", f"{A}/acme/clients/svc").status_code == 404
        bad = qauth(
            helpdesk, "client", "rotate-secret", "--realm", "acme", "strong", "--overlap", "1w"
        )
        assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_local_cli(qimem_home: Path) -> None:
    """``qauth client ...`` on a local store (``qimem init``; the local operator)."""
    from qimem.cli import cli
    from qimem.cli.qauth import qauth

    def run(*args: str) -> Any:
        return CliRunner().invoke(qauth, list(args), catch_exceptions=False)

    init = CliRunner().invoke(cli, ["init", "--admin-password-stdin"], input=ADMIN_PASSWORD + "\n")
    assert init.exit_code == 0, init.output
    made = json.loads(run("client", "create", "svc", "--role", "encryptor", "--json").stdout)
    assert run("client", "list").stdout.split("\n")[1].split()[:2] == ["svc", "enabled"]
    rotated = run("client", "rotate-secret", "svc", "--overlap", "0", "--json")
    new = json.loads(rotated.stdout)["client_secret"]
    assert new != made["client_secret"] and new.startswith("qcs_")
    assert run("client", "disable", "svc").exit_code == 0
    assert json.loads(run("client", "show", "svc", "--json").stdout)["enabled"] is False
    assert run("client", "enable", "svc").exit_code == 0
    assert run("client", "delete", "svc", "--yes").exit_code == 0
    missing = run("client", "show", "svc")
    assert missing.exit_code == 5 and "no service account" in missing.stderr
    bad = run("client", "rotate-secret", "nobody", "--overlap", "forever")
    assert bad.exit_code == 3 and "duration" in bad.stderr
