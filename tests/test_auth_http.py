"""/v1/auth over a live server: OAuth2 grants (form and JSON), refresh rotation, service
accounts, revocation, introspection, JWKS for an independent verifier, scoped grants,
audit, and ``qimem serve``'s refusal to run authenticated without a master realm."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner
from conftest import make_app
from identity_helpers import ADMIN_PASSWORD, serving, with_identity

from qimem.app import AppContext
from qimem.cli import cli
from qimem.services import identity as ids

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def live() -> Iterator[tuple[str, AppContext]]:
    app = with_identity(make_app("memory://", None))
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "alice", "nyvpr-password", ["key-manager", "encryptor", "auditor"])
    with serving(app) as url:
        yield url, app
    ids.close_identity(app)
    app.close()


def token_url(url: str, realm: str = "acme") -> str:
    return f"{url}/v1/auth/realms/{realm}/token"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_password_grant_form_and_json_then_refresh(live: tuple[str, AppContext]) -> None:
    url, _ = live
    form = requests.post(
        token_url(url),
        data={"grant_type": "password", "username": "alice", "password": "nyvpr-password"},
        timeout=10,
    )
    assert form.status_code == 200 and form.headers["Cache-Control"] == "no-store"
    body = form.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 300
    as_json = requests.post(
        token_url(url),
        json={"grant_type": "password", "username": "alice", "password": "nyvpr-password"},
        timeout=10,
    )
    assert as_json.status_code == 200
    refreshed = requests.post(
        token_url(url),
        data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        timeout=10,
    )
    assert refreshed.status_code == 200
    replay = requests.post(
        token_url(url),
        data={"grant_type": "refresh_token", "refresh_token": body["refresh_token"]},
        timeout=10,
    )
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "invalid_grant"
    # The whole family is gone: the token from the successful refresh is refused too.
    again = requests.post(
        token_url(url),
        data={"grant_type": "refresh_token", "refresh_token": refreshed.json()["refresh_token"]},
        timeout=10,
    )
    assert again.status_code == 401


def test_bad_logins_are_indistinguishable(live: tuple[str, AppContext]) -> None:
    url, _ = live
    answers = set()
    for username, password, realm in (
        ("alice", "jebat-password", "acme"),
        ("nobody", "jungrire-pass", "acme"),
        ("alice", "nyvpr-password", "no-such-realm"),
    ):
        response = requests.post(
            token_url(url, realm),
            data={"grant_type": "password", "username": username, "password": password},
            timeout=10,
        )
        answers.add((response.status_code, response.text))
    assert len(answers) == 1
    status, text = answers.pop()
    assert status == 401 and "jebat-password" not in text
    bad = requests.post(token_url(url), data={"grant_type": "implicit"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsupported_grant_type"
    garbage = requests.post(token_url(url), data=b"%%%&&&=", headers=FORM, timeout=10)
    assert garbage.status_code == 400


def test_tokens_work_on_the_security_api_and_can_be_revoked(live: tuple[str, AppContext]) -> None:
    url, _ = live
    tokens = requests.post(
        token_url(url),
        data={"grant_type": "password", "username": "alice", "password": "nyvpr-password"},
        timeout=10,
    ).json()
    access = tokens["access_token"]
    created = requests.post(
        f"{url}/v1/security/keys", json={"name": "k1"}, headers=bearer(access), timeout=10
    )
    assert created.status_code == 201 and created.json()["realm"] == "acme"
    sealed = requests.post(
        f"{url}/v1/security/encrypt",
        json={"key": "k1", "plaintext": base64.b64encode(b"hello").decode()},
        headers=bearer(access),
        timeout=10,
    )
    assert sealed.status_code == 200
    info = requests.post(
        f"{url}/v1/auth/realms/acme/introspect",
        data={"token": access},
        headers=bearer(access),
        timeout=10,
    ).json()
    assert info["active"] and info["username"] == "alice"
    revoked = requests.post(f"{url}/v1/auth/realms/acme/revoke", data={"token": access}, timeout=10)
    assert revoked.status_code == 200
    refused = requests.get(f"{url}/v1/security/keys", headers=bearer(access), timeout=10)
    assert refused.status_code == 401
    # The refresh token still works until it is revoked in turn.
    fresh = requests.post(
        token_url(url),
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        timeout=10,
    ).json()
    assert requests.get(
        f"{url}/v1/security/keys", headers=bearer(fresh["access_token"]), timeout=10
    ).ok
    requests.post(
        f"{url}/v1/auth/realms/acme/revoke", data={"token": fresh["refresh_token"]}, timeout=10
    )
    denied = requests.post(
        token_url(url),
        data={"grant_type": "refresh_token", "refresh_token": fresh["refresh_token"]},
        timeout=10,
    )
    assert denied.status_code == 401
    # The audit log saw the key operations, logins, refreshes and the revocation.
    events = requests.get(
        f"{url}/v1/auth/realms/acme/audit?limit=200",
        headers=bearer(fresh["access_token"]),
        timeout=10,
    ).json()["events"]
    actions = {(e["action"], e["outcome"]) for e in events}
    assert {
        ("keys.create", "success"),
        ("crypto.encrypt", "success"),
        ("login", "success"),
        ("token.refresh", "success"),
        ("token.revoke", "success"),
    } <= actions
    text = json.dumps(events)
    for secret in (access, tokens["refresh_token"], fresh["refresh_token"], "nyvpr-password"):
        assert secret not in text


def test_service_account_and_admin_api(live: tuple[str, AppContext]) -> None:
    url, app = live
    admin = requests.post(
        token_url(url, "master"),
        data={"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
        timeout=10,
    ).json()["access_token"]
    head = {**bearer(admin), "Content-Type": "application/json"}
    made = requests.post(
        f"{url}/v1/auth/realms/acme/clients",
        json={"client_id": "batch", "roles": ["encryptor"]},
        headers=head,
        timeout=10,
    )
    assert made.status_code == 201
    secret = made.json()["client_secret"]
    machine = requests.post(
        token_url(url),
        data={"grant_type": "client_credentials", "client_id": "batch", "client_secret": secret},
        timeout=10,
    )
    assert machine.status_code == 200 and "refresh_token" not in machine.json()
    wrong = requests.post(
        token_url(url),
        data={"grant_type": "client_credentials", "client_id": "batch", "client_secret": "qcs_x"},
        timeout=10,
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_client"
    # Users, roles and scoped grants through the API.
    assert (
        requests.post(
            f"{url}/v1/auth/realms/acme/users",
            json={"username": "pat", "password": "cng-password", "roles": []},
            headers=head,
            timeout=10,
        ).status_code
        == 201
    )
    assert requests.post(
        f"{url}/v1/auth/realms/acme/users/pat/roles",
        json={"role": "encryptor", "scope": "payroll-*"},
        headers=head,
        timeout=10,
    ).json()["added"]
    for name in ("payroll-2026", "hr-2026"):
        requests.post(
            f"{url}/v1/security/keys",
            json={"name": name},
            headers={**head, "X-Qimem-Realm": "acme"},
            timeout=10,
        ).raise_for_status()
    pat = requests.post(
        token_url(url),
        data={"grant_type": "password", "username": "pat", "password": "cng-password"},
        timeout=10,
    ).json()["access_token"]

    def encrypt(body: dict) -> requests.Response:
        return requests.post(
            f"{url}/v1/security/encrypt", json=body, headers=bearer(pat), timeout=10
        )

    payroll = encrypt({"key": "payroll-2026", "plaintext": "aGk="})
    assert payroll.status_code == 200
    assert encrypt({"key": "hr-2026", "plaintext": "aGk="}).status_code == 403
    mixed = {
        "items": [
            {"key": "payroll-2026", "plaintext": "aGk="},
            {"key": "hr-2026", "plaintext": "aGk="},
        ]
    }
    assert encrypt(mixed).status_code == 403
    opened = requests.post(
        f"{url}/v1/security/decrypt",
        json={"envelope": payroll.json()["envelope"]},
        headers=bearer(pat),
        timeout=10,
    )
    assert opened.status_code == 200 and opened.json()["plaintext"] == "aGk="
    assert (
        requests.get(f"{url}/v1/security/keys", headers=bearer(pat), timeout=10).status_code == 403
    )
    # Disabling a user through the API stops their logins.
    assert (
        requests.patch(
            f"{url}/v1/auth/realms/acme/users/pat",
            json={"enabled": False},
            headers=head,
            timeout=10,
        ).json()["enabled"]
        is False
    )
    assert (
        requests.post(
            token_url(url),
            data={"grant_type": "password", "username": "pat", "password": "cng-password"},
            timeout=10,
        ).status_code
        == 401
    )


def test_jwks_over_http_verifies_tokens_with_jwcrypto(live: tuple[str, AppContext]) -> None:
    from jwcrypto import jwk, jwt

    url, _ = live
    access = requests.post(
        token_url(url),
        data={"grant_type": "password", "username": "alice", "password": "nyvpr-password"},
        timeout=10,
    ).json()["access_token"]
    jwks = requests.get(f"{url}/v1/auth/realms/acme/jwks", timeout=10)
    assert jwks.status_code == 200
    keyset = jwk.JWKSet.from_json(jwks.text)
    verified = jwt.JWT(jwt=access, key=keyset, algs=["EdDSA"], expected_type="JWS")
    claims = json.loads(verified.claims)
    assert claims["realm"] == "acme" and claims["aud"] == "qimem"
    assert claims["iss"] == "qimem/realms/acme" and "encryptor" in claims["roles"]


def test_insecure_mode_still_serves_loopback_without_tokens() -> None:
    app = make_app("memory://", None)
    try:
        with serving(app, insecure_no_auth=True) as url:
            created = requests.post(f"{url}/v1/security/keys", json={"name": "k"}, timeout=10)
            assert created.status_code == 201
    finally:
        app.close()


def test_serve_with_auth_needs_a_master_realm(qimem_home: object) -> None:
    result = CliRunner().invoke(cli, ["--store", "memory://", "serve"])
    assert result.exit_code == 9
    assert "qimem init" in result.output and "--insecure-no-auth" in result.output
    assert "Traceback" not in result.output
