"""Every protected endpoint × every way a request can be unauthorized, on a live server.

Cases: no token, expired, revoked, alg none, wrong signing key, tampered claims, HS256
keyed with the public key (all 401); a valid token without the permission (403); a token
of another realm (404: the realm and its keys do not exist for it). A positive control
with the right token shows each endpoint really serves.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from conftest import make_app
from forge import alg_none, hs256_variants, tampered, wrong_key
from identity_helpers import ADMIN_PASSWORD, password_login, serving, unique, with_identity

from qimem import services
from qimem.app import AppContext
from qimem.services import identity as ids


@dataclass
class World:
    url: str
    app: AppContext
    key_id: str
    envelope: str
    tokens: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    body: Callable[[World], Any] | None = None
    permission: str | None = "x"  # None: any valid token (no 403 case)
    realm_in_path: bool = False
    master_only: bool = False
    owner: str = "acme_admin"  # whose token is the positive control

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


ENDPOINTS = [
    Endpoint("POST", "/v1/security/keys", lambda w: {"name": unique("k")}),
    Endpoint("GET", "/v1/security/keys"),
    Endpoint("GET", "/v1/security/keys/{key_id}"),
    Endpoint("POST", "/v1/security/encrypt", lambda w: {"key_id": w.key_id, "plaintext": "aGk="}),
    Endpoint("POST", "/v1/security/decrypt", lambda w: {"envelope": w.envelope}),
    Endpoint("POST", "/v1/security/rewrap", lambda w: {"envelope": w.envelope}),
    Endpoint("POST", "/v1/security/datakey", lambda w: {"key": "k1"}),
    Endpoint("POST", "/v1/security/rotate", lambda w: {"key": unique_key(w)}),
    Endpoint("POST", "/v1/security/sign", lambda w: {"key": "s1", "message": "aGk="}),
    Endpoint(
        "POST",
        "/v1/security/verify",
        lambda w: {"key": "s1", "message": "aGk=", "signature": "AAAA"},
    ),
    Endpoint("POST", "/v1/security/mac", lambda w: {"key": "m1", "data": "aGk="}),
    Endpoint(
        "POST", "/v1/security/verify-mac", lambda w: {"key": "m1", "data": "aGk=", "tag": "AAAA"}
    ),
    Endpoint("GET", "/v1/security/keys/s1/public"),
    Endpoint("POST", "/v1/security/random", lambda w: {"bytes": 16}, permission=None),
    Endpoint("POST", "/v1/security/hash", lambda w: {"data": "aGk="}, permission=None),
    Endpoint("GET", "/v1/openapi.json", permission=None),
    Endpoint("GET", "/v1/auth/realms", master_only=True, owner="master_admin"),
    Endpoint(
        "POST",
        "/v1/auth/realms",
        lambda w: {"name": unique("r")},
        master_only=True,
        owner="master_admin",
    ),
    Endpoint(
        "DELETE",
        "/v1/auth/realms/{victim}",
        realm_in_path=True,
        master_only=True,
        owner="master_admin",
    ),
    Endpoint("GET", "/v1/auth/realms/acme/users", realm_in_path=True),
    Endpoint(
        "POST",
        "/v1/auth/realms/acme/users",
        lambda w: {"username": unique("u"), "password": "a-long-password"},
        realm_in_path=True,
    ),
    Endpoint(
        "PATCH",
        "/v1/auth/realms/acme/users/reader",
        lambda w: {"enabled": True},
        realm_in_path=True,
    ),
    Endpoint(
        "POST",
        "/v1/auth/realms/acme/users/reader/roles",
        lambda w: {"role": "auditor"},
        realm_in_path=True,
    ),
    Endpoint(
        "DELETE",
        "/v1/auth/realms/acme/users/spare/roles",
        lambda w: {"role": "auditor"},
        realm_in_path=True,
    ),
    Endpoint("GET", "/v1/auth/realms/acme/roles", realm_in_path=True),
    Endpoint(
        "POST",
        "/v1/auth/realms/acme/roles",
        lambda w: {"name": unique("role"), "permissions": ["keys:read"]},
        realm_in_path=True,
    ),
    Endpoint(
        "POST",
        "/v1/auth/realms/acme/clients",
        lambda w: {"client_id": unique("c")},
        realm_in_path=True,
    ),
    Endpoint("GET", "/v1/auth/realms/acme/audit", realm_in_path=True),
    Endpoint(
        "POST",
        "/v1/auth/realms/acme/introspect",
        lambda w: {"token": "x" * 20},
        permission=None,
        realm_in_path=True,
    ),
    Endpoint("POST", "/v1/auth/realms/acme/signing-key/rotate", realm_in_path=True),
]


def unique_key(world: World) -> str:
    name = unique("rot")
    services.create_key(world.app, name=name, realm="acme")
    return name


UNAUTHENTICATED = ["no_token", "expired", "revoked", "alg_none", "wrong_key", "tampered", "hs256"]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    app = with_identity(make_app("memory://", None))
    ids.create_realm(app, "acme")
    ids.create_realm(app, "beta")
    ids.add_user(app, "acme", "boss", "obff-password", ["admin"])
    ids.create_role(app, "acme", "plugin-viewer", ["plugins:read"])
    ids.add_user(app, "acme", "reader", "ernqre-password", ["plugin-viewer"])
    ids.add_user(app, "acme", "spare", "fcner-password", ["auditor"])
    ids.add_user(app, "beta", "intruder", "vagehqre-password", ["admin"])
    key = services.create_key(app, name="k1", realm="acme")
    services.create_key(app, name="s1", algorithm="ed25519", realm="acme")
    services.create_key(app, name="m1", algorithm="hmac-sha256", realm="acme")
    sealed = services.encrypt(app, "k1", b"secret", realm="acme")
    with serving(app) as url:
        w = World(url, app, key.key_id, base64.b64encode(sealed.envelope).decode())
        login = lambda realm, user, pw: password_login(app, realm, user, pw).access_token  # noqa: E731
        w.tokens["master_admin"] = login("master", "admin", ADMIN_PASSWORD)
        w.tokens["acme_admin"] = login("acme", "boss", "obff-password")
        w.tokens["reader"] = login("acme", "reader", "ernqre-password")
        w.tokens["intruder"] = login("beta", "intruder", "vagehqre-password")
        ident = ids.identity(app)
        boss = ident.get_user("acme", "boss")
        w.tokens["expired"] = ident.tokens.issue(
            "acme", boss.user_id, "boss", ["admin"], now=time.time() - 3600
        ).token
        revoked = login("acme", "boss", "obff-password")
        ids.revoke(app, "acme", revoked)
        w.tokens["revoked"] = revoked
        good = w.tokens["acme_admin"]
        jwks = ids.jwks(app, "acme")
        w.tokens["alg_none"] = alg_none(good)
        w.tokens["wrong_key"] = wrong_key(good)
        w.tokens["tampered"] = tampered(w.tokens["reader"], roles=["admin"])
        w.tokens["hs256"] = hs256_variants(good, jwks)[0]
        yield w
    ids.close_identity(app)
    app.close()


def call(
    world: World,
    ep: Endpoint,
    token: str | None,
    headers: dict[str, str] | None = None,
    victim: str | None = None,
) -> requests.Response:
    path = ep.path.replace("{key_id}", world.key_id)
    if "{victim}" in path:
        if victim is None:
            victim = unique("victim")
            ids.create_realm(world.app, victim)
        path = path.replace("{victim}", victim)
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    body = ep.body(world) if ep.body else None
    return requests.request(ep.method, world.url + path, json=body, headers=all_headers, timeout=10)


def error_code(response: requests.Response) -> str:
    return response.json()["error"]["code"]


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.label)
@pytest.mark.parametrize("case", UNAUTHENTICATED)
def test_unauthenticated_requests_get_401(world: World, ep: Endpoint, case: str) -> None:
    response = call(world, ep, None if case == "no_token" else world.tokens[case])
    assert response.status_code == 401, (case, response.status_code, response.text)
    assert error_code(response) in ("unauthorized", "invalid_token")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("ep", [e for e in ENDPOINTS if e.permission], ids=lambda e: e.label)
def test_wrong_permission_gets_403(world: World, ep: Endpoint) -> None:
    # Realm deletion aimed at the caller's own realm: the permission is what is missing.
    response = call(world, ep, world.tokens["reader"], victim="acme")
    assert response.status_code == 403, (response.status_code, response.text)
    assert error_code(response) == "forbidden"


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.label)
def test_other_realm_gets_404(world: World, ep: Endpoint) -> None:
    """A beta admin reaching into acme: acme's URL paths, or acme chosen by header."""
    headers = None if ep.realm_in_path or ep.master_only else {"X-Qimem-Realm": "acme"}
    response = call(world, ep, world.tokens["intruder"], headers)
    if ep.master_only and not ep.realm_in_path:
        assert response.status_code == 403, response.text  # deployment-wide: master only
    else:
        assert response.status_code == 404, (response.status_code, response.text)
        assert error_code(response) in ("not_found", "realm_not_found")


@pytest.mark.parametrize("ep", ENDPOINTS, ids=lambda e: e.label)
def test_right_token_is_served(world: World, ep: Endpoint) -> None:
    response = call(world, ep, world.tokens[ep.owner])
    assert response.status_code < 300, (response.status_code, response.text)


def test_another_realms_key_is_404_in_its_own_realm(world: World) -> None:
    """Without any header, the beta token acts in beta, where acme's key does not exist."""
    headers = {"Authorization": f"Bearer {world.tokens['intruder']}"}
    for method, path, body in (
        ("GET", f"/v1/security/keys/{world.key_id}", None),
        ("POST", "/v1/security/encrypt", {"key_id": world.key_id, "plaintext": "aGk="}),
        ("POST", "/v1/security/decrypt", {"envelope": world.envelope}),
        ("POST", "/v1/security/rotate", {"key_id": world.key_id}),
    ):
        response = requests.request(
            method, world.url + path, json=body, headers=headers, timeout=10
        )
        assert response.status_code == 404, (path, response.text)
    listed = requests.get(world.url + "/v1/security/keys", headers=headers, timeout=10).json()
    assert world.key_id not in str(listed)


def test_master_admin_acts_on_a_realm_explicitly(world: World) -> None:
    headers = {"Authorization": f"Bearer {world.tokens['master_admin']}", "X-Qimem-Realm": "acme"}
    response = requests.get(
        f"{world.url}/v1/security/keys/{world.key_id}", headers=headers, timeout=10
    )
    assert response.status_code == 200 and response.json()["realm"] == "acme"
    # Without the header the master admin is in master, where the key is not.
    del headers["X-Qimem-Realm"]
    response = requests.get(
        f"{world.url}/v1/security/keys/{world.key_id}", headers=headers, timeout=10
    )
    assert response.status_code == 404
    # An acme admin cannot reach master the same way.
    headers = {"Authorization": f"Bearer {world.tokens['acme_admin']}", "X-Qimem-Realm": "master"}
    assert (
        requests.get(f"{world.url}/v1/security/keys", headers=headers, timeout=10).status_code
        == 404
    )


def test_public_endpoints_need_no_token(world: World) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v1/auth/realms/acme/jwks"):
        assert requests.get(world.url + path, timeout=10).status_code == 200, path
    assert requests.get(world.url + "/v1/auth/realms/nope/jwks", timeout=10).status_code == 404
