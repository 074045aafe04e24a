"""``GET|POST /v1/plugins`` and ``GET|DELETE /v1/plugins/{name}``: through Falcon's test
client on memory, SQLite and PostgreSQL stores, registrations shared by two app contexts on
one database, and permissions (plugins:read / plugins:admin) on a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import make_app
from falcon import testing
from identity_helpers import ADMIN_PASSWORD, password_login, serving, with_identity

from qimem.app import AppContext
from qimem.manifest import PLUGIN_API
from qimem.server.app import create_app
from qimem.services import identity as ids

BUILTINS = {"aes-256-gcm", "chacha20-poly1305", "memory-keystore", "sql-keystore"}
BUILTINS |= {"key-purposes"}  # signing, MAC and deterministic algorithms (issue 16)
BUILTINS |= {"password-auth", "ldap-auth", "jwt-auth"}  # login providers (issue 15)
BUILTINS |= {"root-file", "root-pkcs11", "root-qimem"}  # root-key providers (issue 18)


def manifest(name: str = "siv", **changes: Any) -> dict[str, Any]:
    data = {
        "name": name,
        "version": "1.2.0",
        "description": "AES-256-GCM-SIV",
        "qimem_api": ">=1,<2",
        "provides": {"algorithms": ["aes-256-gcm-siv"], "event_hooks": ["qimem_key_event"]},
        "homepage": "https://example.org/siv",
    }
    data.update(changes)
    return data


def client_for(app: AppContext) -> testing.TestClient:
    return testing.TestClient(create_app(app, insecure_no_auth=True))


@pytest.fixture
def client(any_app: AppContext) -> testing.TestClient:
    return client_for(any_app)


def error(result: testing.Result) -> dict[str, str]:
    assert result.headers["content-type"].startswith("application/json")
    return result.json["error"]  # type: ignore[no-any-return]


def test_list_shows_builtins(client: testing.TestClient) -> None:
    result = client.simulate_get("/v1/plugins")
    assert result.status_code == 200
    assert result.json["plugin_api"] == PLUGIN_API
    plugins = {p["name"]: p for p in result.json["plugins"]}
    assert set(plugins) == BUILTINS
    assert all(p["loaded"] and p["builtin"] for p in plugins.values())
    shown = client.simulate_get("/v1/plugins/sql-keystore")
    assert shown.status_code == 200
    assert "postgresql+psycopg" in shown.json["manifest"]["provides"]["keystores"]


def test_register_show_remove(client: testing.TestClient) -> None:
    created = client.simulate_post("/v1/plugins", json=manifest())
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/v1/plugins/siv"
    body = created.json
    assert body["registered"] and not body["installed"] and not body["loaded"]
    assert body["registered_manifest"] == {
        **manifest(),
        "provides": {
            "algorithms": ["aes-256-gcm-siv"],
            "keystores": [],
            "auth_providers": [],
            "root_key_providers": [],
            "event_hooks": ["qimem_key_event"],
        },
    }
    assert body["reason"] == "not installed (only its manifest is registered)"

    listed = {p["name"] for p in client.simulate_get("/v1/plugins").json["plugins"]}
    assert listed == BUILTINS | {"siv"}
    assert client.simulate_get("/v1/plugins/siv").json["registered"] is True

    again = client.simulate_post("/v1/plugins", json=manifest(version="9.0"))
    assert again.status_code == 409 and error(again)["code"] == "plugin_registered"

    deleted = client.simulate_delete("/v1/plugins/siv")
    assert deleted.status_code == 204 and deleted.content == b""
    missing = client.simulate_get("/v1/plugins/siv")
    assert missing.status_code == 404 and error(missing)["code"] == "plugin_not_found"
    gone = client.simulate_delete("/v1/plugins/siv")
    assert gone.status_code == 404 and error(gone)["code"] == "plugin_not_found"


@pytest.mark.parametrize(
    ("body", "status", "code", "fragment"),
    [
        (manifest(version=3), 400, "invalid_manifest", "field 'version' must be a string"),
        (manifest(name="Bad Name"), 400, "invalid_manifest", "field 'name' must be 1-64"),
        ({"name": "x"}, 400, "invalid_manifest", "field 'qimem_api' is required"),
        (manifest(bogus=1), 400, "invalid_manifest", "field 'bogus' is not a manifest field"),
        (
            manifest(provides={"event_hooks": ["qimem_login"]}),
            400,
            "invalid_manifest",
            "field 'provides.event_hooks[0]' 'qimem_login' is not an event hook",
        ),
        (["a", "list"], 400, "invalid_manifest", "a manifest must be a table"),
        (
            manifest(qimem_api=">=2,<3"),
            400,
            "incompatible_plugin",
            "it requires qimem plugin API '>=2,<3'",
        ),
        (
            manifest(name="aes-256-gcm"),
            409,
            "plugin_registered",
            "'aes-256-gcm' is the name of a built-in plugin",
        ),
    ],
)
def test_register_refusals(
    memory_app: AppContext, body: Any, status: int, code: str, fragment: str
) -> None:
    client = client_for(memory_app)
    result = client.simulate_post("/v1/plugins", json=body)
    assert result.status_code == status, result.text
    assert error(result)["code"] == code
    assert fragment in error(result)["message"]
    assert error(result)["message"].startswith(
        ("request body: invalid plugin manifest: ", "plugin '", "'aes")
    )
    listed = {p["name"] for p in client.simulate_get("/v1/plugins").json["plugins"]}
    assert listed == BUILTINS


def test_bad_bodies_and_names(memory_app: AppContext) -> None:
    client = client_for(memory_app)
    not_json = client.simulate_post(
        "/v1/plugins", body=b"name = 'x'", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    wrong_type = client.simulate_post(
        "/v1/plugins", body=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415
    for name in ("UPPER", "-dash", "a" * 65, "sp ace"):
        assert client.simulate_get(f"/v1/plugins/{name}").status_code == 404
        assert client.simulate_delete(f"/v1/plugins/{name}").status_code == 404
    builtin = client.simulate_delete("/v1/plugins/aes-256-gcm")
    assert builtin.status_code == 409 and error(builtin)["code"] == "plugin_builtin"
    too_big = testing.TestClient(create_app(memory_app, insecure_no_auth=True, max_body_bytes=64))
    large = too_big.simulate_post("/v1/plugins", json=manifest(description="x" * 200))
    assert large.status_code == 413


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_registrations_are_shared_through_the_store(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, root_key_b64: str
) -> None:
    """Two app contexts (two servers) on one database see one catalog, and it survives
    reopening: registered manifests persist in the store."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    first, second = make_app(url, root_key_b64), make_app(url, root_key_b64)
    try:
        a, b = client_for(first), client_for(second)
        assert a.simulate_post("/v1/plugins", json=manifest("shared")).status_code == 201
        assert b.simulate_get("/v1/plugins/shared").json["registered_manifest"]["version"] == (
            "1.2.0"
        )
        assert b.simulate_post("/v1/plugins", json=manifest("shared")).status_code == 409
        assert b.simulate_post("/v1/plugins", json=manifest("other")).status_code == 201
    finally:
        first.close()
        second.close()
    reopened = make_app(url, root_key_b64)
    try:
        client = client_for(reopened)
        names = {p["name"] for p in client.simulate_get("/v1/plugins").json["plugins"]}
        assert {"shared", "other"} <= names
        assert client.simulate_delete("/v1/plugins/shared").status_code == 204
        assert client.simulate_get("/v1/plugins/shared").status_code == 404
    finally:
        reopened.close()


def test_memory_store_registrations_live_with_the_process() -> None:
    app = make_app("memory://", None)
    try:
        client = client_for(app)
        assert client.simulate_post("/v1/plugins", json=manifest("temp")).status_code == 201
        assert client.simulate_get("/v1/plugins/temp").status_code == 200
    finally:
        app.close()
    fresh = make_app("memory://", None)
    try:
        assert client_for(fresh).simulate_get("/v1/plugins/temp").status_code == 404
    finally:
        fresh.close()


# ---------------------------------------------------------------- permissions


class Tokens(dict[str, str]):
    """Access tokens by user; never shown in a failure report."""

    def __repr__(self) -> str:
        return f"<tokens of {', '.join(self)}>"


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[str, Tokens]]:
    app = with_identity(make_app("memory://", None))
    ids.create_role(app, "master", "plugin-viewer", ["plugins:read"])
    ids.add_user(app, "master", "viewer", "ivrjre-password", ["plugin-viewer"])
    ids.add_user(app, "master", "sealer", "frnyre-password", ["encryptor"])
    ids.create_realm(app, "acme")
    ids.add_user(app, "acme", "boss", "obff-password", ["admin"])
    tokens = Tokens(
        (user, password_login(app, realm, user, password).access_token)
        for realm, user, password in (
            ("master", "admin", ADMIN_PASSWORD),
            ("master", "viewer", "ivrjre-password"),
            ("master", "sealer", "frnyre-password"),
            ("acme", "boss", "obff-password"),
        )
    )
    try:
        with serving(app) as url:
            yield url, tokens
    finally:
        ids.close_identity(app)
        app.close()


def _call(url: str, method: str, path: str, token: str | None, body: Any = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, url + path, json=body, headers=headers, timeout=10)


def test_permissions_on_a_live_server(secured: tuple[str, Tokens]) -> None:
    url, tokens = secured
    for method, path, body in (
        ("GET", "/v1/plugins", None),
        ("GET", "/v1/plugins/aes-256-gcm", None),
        ("POST", "/v1/plugins", manifest("perm")),
        ("DELETE", "/v1/plugins/perm", None),
    ):
        unauthenticated = _call(url, method, path, None, body)
        assert unauthenticated.status_code == 401
        assert unauthenticated.headers["WWW-Authenticate"].startswith("Bearer")
        assert _call(url, method, path, tokens["sealer"], body).status_code == 403

    # plugins:read may look, not change.
    assert _call(url, "GET", "/v1/plugins", tokens["viewer"]).status_code == 200
    assert _call(url, "GET", "/v1/plugins/aes-256-gcm", tokens["viewer"]).status_code == 200
    assert _call(url, "POST", "/v1/plugins", tokens["viewer"], manifest("p")).status_code == 403
    # plugins:admin is a deployment-wide power: another realm's admin is refused.
    assert _call(url, "POST", "/v1/plugins", tokens["boss"], manifest("p")).status_code in (
        403,
        404,
    )
    created = _call(url, "POST", "/v1/plugins", tokens["admin"], manifest("perm"))
    assert created.status_code == 201, created.text
    listed = _call(url, "GET", "/v1/plugins", tokens["viewer"]).json()
    assert "perm" in {p["name"] for p in listed["plugins"]}
    assert _call(url, "DELETE", "/v1/plugins/perm", tokens["viewer"]).status_code == 403
    assert _call(url, "DELETE", "/v1/plugins/perm", tokens["admin"]).status_code == 204
    assert json.loads(_call(url, "GET", "/v1/plugins/perm", tokens["admin"]).text)["error"][
        "code"
    ] == ("plugin_not_found")
