"""Key lifecycle over HTTP (issue 7): policy, version states, deletion, export/import,
with token authentication, permissions, error codes and audit records."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from conftest import make_app
from falcon import testing
from identity_helpers import ADMIN_PASSWORD, password_login, with_identity

from qimem.app import AppContext
from qimem.server.app import create_app
from qimem.services import identity as ids

PASSPHRASE = "a long backup passphrase"


@pytest.fixture
def app() -> Iterator[AppContext]:
    ctx = with_identity(make_app("memory://", None))
    ids.add_user(ctx, "master", "keeper", "xrrcre-password", ["key-manager"])
    ids.add_user(ctx, "master", "user", "hfre-password-1", ["encryptor"])
    yield ctx
    ctx.close()


class Api:
    def __init__(self, ctx: AppContext, username: str, password: str) -> None:
        self.client = testing.TestClient(create_app(ctx))
        token = password_login(ctx, "master", username, password).access_token
        self.headers = {"Authorization": f"Bearer {token}"}

    def post(self, path: str, body: object = None) -> testing.Result:
        return self.client.simulate_post(path, json=body, headers=self.headers)

    def get(self, path: str) -> testing.Result:
        return self.client.simulate_get(path, headers=self.headers)


def _seal(api: Api, key: str, text: bytes) -> dict[str, object]:
    result = api.post(
        "/v1/security/encrypt", {"key": key, "plaintext": base64.b64encode(text).decode()}
    )
    assert result.status_code == 200, result.text
    return result.json  # type: ignore[no-any-return]


def test_policy_states_and_deletion(app: AppContext) -> None:
    admin = Api(app, "admin", ADMIN_PASSWORD)
    assert admin.post("/v1/security/keys", {"name": "orders"}).status_code == 201
    old = _seal(admin, "orders", b"old")
    assert admin.post("/v1/security/rotate", {"key": "orders"}).status_code == 200

    shown = admin.get("/v1/security/keys/orders/policy")
    assert shown.status_code == 200
    assert shown.json["policy"]["min_decryption_version"] == 1
    # Counts are reserved in blocks before use: at least what was used, never less.
    assert 1 <= shown.json["usage"]["1"] <= 64
    assert shown.json["usage"]["2"] == 0

    changed = admin.post(
        "/v1/security/keys/orders/policy",
        {"min_decryption_version": 2, "usage_limit": 1000, "auto_rotate_seconds": 86400},
    )
    assert changed.status_code == 200, changed.text
    assert changed.json["policy"]["usage_limit"] == 1000
    refused = admin.post("/v1/security/decrypt", {"envelope": old["envelope"]})
    assert refused.status_code == 422
    assert refused.json["error"]["code"] == "below_min_decryption_version"
    cleared = admin.post(
        "/v1/security/keys/orders/policy", {"min_decryption_version": 1, "usage_limit": None}
    )
    assert cleared.json["policy"]["usage_limit"] is None
    assert cleared.json["policy"]["auto_rotate_seconds"] == 86400

    active = admin.post("/v1/security/keys/orders/destroy", {"version": 2})
    assert active.status_code == 409
    assert active.json["error"]["code"] == "key_active"
    disabled = admin.post("/v1/security/keys/orders/disable", {"version": 1})
    assert disabled.status_code == 200 and disabled.json["state"] == "disabled"
    gone = admin.post("/v1/security/decrypt", {"envelope": old["envelope"]})
    assert gone.json["error"]["code"] == "key_disabled"
    enabled = admin.post(f"/v1/security/keys/{old['key_id']}/enable")
    assert enabled.json["state"] == "decrypt-only"
    destroyed = admin.post("/v1/security/keys/orders/destroy", {"version": 1})
    assert destroyed.json["state"] == "destroyed"
    dead = admin.post("/v1/security/decrypt", {"envelope": old["envelope"]})
    assert (dead.status_code, dead.json["error"]["code"]) == (422, "key_destroyed")

    scheduled = admin.post("/v1/security/keys/orders/schedule-deletion", {"days": 7})
    assert scheduled.status_code == 200 and scheduled.json["deletion_date"]
    pending = admin.post(
        "/v1/security/encrypt", {"key": "orders", "plaintext": base64.b64encode(b"x").decode()}
    )
    assert (pending.status_code, pending.json["error"]["code"]) == (409, "key_pending_deletion")
    assert admin.post("/v1/security/keys/orders/cancel-deletion").status_code == 200
    _seal(admin, "orders", b"works again")

    events = [(e.actor, e.action) for e in ids.audit_events(app, "master", limit=500)]
    for action in ("keys.policy", "keys.disable", "keys.enable", "keys.destroy"):
        assert ("admin@master", action) in events
    assert ("admin@master", "keys.schedule_deletion") in events


def test_bad_requests(app: AppContext) -> None:
    admin = Api(app, "admin", ADMIN_PASSWORD)
    admin.post("/v1/security/keys", {"name": "k"})
    cases = [
        ("/v1/security/keys/k/policy", {"bogus": 1}, 400, "unknown_field"),
        ("/v1/security/keys/k/policy", {"usage_limit": "many"}, 400, "invalid_type"),
        ("/v1/security/keys/k/policy", {"min_decryption_version": 5}, 400, "invalid_policy"),
        ("/v1/security/keys/k/disable", {}, 400, "invalid_request"),
        ("/v1/security/keys/k/disable", {"version": 9}, 404, "not_found"),
        ("/v1/security/keys/nope/disable", {"version": 1}, 404, "not_found"),
        ("/v1/security/keys/k/schedule-deletion", {"days": 1}, 400, "invalid_request"),
        ("/v1/security/keys/k/cancel-deletion", {}, 409, "not_pending_deletion"),
        ("/v1/security/keys/k/export", {"passphrase": "short"}, 400, "weak_passphrase"),
        (
            "/v1/security/import",
            {"backup": "bm90IGpzb24=", "passphrase": PASSPHRASE},
            400,
            "invalid_backup",
        ),
    ]
    for path, body, status, code in cases:
        result = admin.post(path, body)
        assert (result.status_code, result.json["error"]["code"]) == (status, code), path


def test_permissions(app: AppContext) -> None:
    Api(app, "admin", ADMIN_PASSWORD).post("/v1/security/keys", {"name": "k"})
    keeper = Api(app, "keeper", "xrrcre-password")
    user = Api(app, "user", "hfre-password-1")
    assert keeper.post("/v1/security/keys/k/policy", {"usage_limit": 10}).status_code == 200
    assert user.get("/v1/security/keys/k/policy").status_code == 200  # keys:read
    assert user.post("/v1/security/keys/k/policy", {"usage_limit": 5}).status_code == 403
    assert user.post("/v1/security/keys/k/schedule-deletion", {}).status_code == 403
    # A backup holds key material: realm administrators only.
    assert keeper.post("/v1/security/keys/k/export", {"passphrase": PASSPHRASE}).status_code == 403
    anonymous = testing.TestClient(create_app(app)).simulate_post(
        "/v1/security/keys/k/disable", json={"version": 1}
    )
    assert anonymous.status_code == 401


def test_export_and_import_between_servers(app: AppContext) -> None:
    admin = Api(app, "admin", ADMIN_PASSWORD)
    admin.post("/v1/security/keys", {"name": "moving"})
    first = _seal(admin, "moving", b"first")
    admin.post("/v1/security/rotate", {"key": "moving"})
    second = _seal(admin, "moving", b"second")
    exported = admin.post("/v1/security/keys/moving/export", {"passphrase": PASSPHRASE})
    assert exported.status_code == 200, exported.text
    blob = base64.b64decode(exported.json["backup"])
    assert b"moving" not in blob  # names, ids and material are all sealed

    fresh = with_identity(make_app("memory://", None))
    try:
        other = Api(fresh, "admin", ADMIN_PASSWORD)
        wrong = other.post(
            "/v1/security/import", {"backup": exported.json["backup"], "passphrase": "x" * 12}
        )
        assert (wrong.status_code, wrong.json["error"]["code"]) == (422, "backup_decryption_failed")
        body = {"backup": exported.json["backup"], "passphrase": PASSPHRASE}
        imported = other.post("/v1/security/import", body)
        assert imported.status_code == 201, imported.text
        assert imported.json["keys"][0]["name"] == "moving"
        assert imported.json["keys"][0]["versions"] == 2
        for sealed, text in ((first, b"first"), (second, b"second")):
            opened = other.post("/v1/security/decrypt", {"envelope": sealed["envelope"]})
            assert base64.b64decode(opened.json["plaintext"]) == text
            assert opened.json["key_id"] == sealed["key_id"]  # key_ids preserved
        assert _seal(other, "moving", b"x")["key_id"] == second["key_id"]
        again = other.post("/v1/security/import", body)
        assert (again.status_code, again.json["error"]["code"]) == (409, "key_exists")
    finally:
        fresh.close()


def test_derived_key_over_http(app: AppContext) -> None:
    admin = Api(app, "admin", ADMIN_PASSWORD)
    created = admin.post("/v1/security/keys", {"name": "tenants", "derived": True})
    assert created.status_code == 201, created.text
    ctx = base64.b64encode(b"tenant-a").decode()
    text = base64.b64encode(b"secret").decode()
    sealed = admin.post(
        "/v1/security/encrypt", {"key": "tenants", "plaintext": text, "context": ctx}
    )
    assert sealed.status_code == 200, sealed.text
    envelope = sealed.json["envelope"]
    missing = admin.post("/v1/security/decrypt", {"envelope": envelope})
    assert (missing.status_code, missing.json["error"]["code"]) == (400, "context_required")
    other = base64.b64encode(b"tenant-b").decode()
    wrong = admin.post("/v1/security/decrypt", {"envelope": envelope, "context": other})
    assert (wrong.status_code, wrong.json["error"]["code"]) == (422, "decryption_failed")
    batch = admin.post("/v1/security/decrypt", {"items": [{"envelope": envelope, "context": ctx}]})
    assert base64.b64decode(batch.json["items"][0]["plaintext"]) == b"secret"
    made = admin.post("/v1/security/datakey", {"key": "tenants", "context": ctx})
    assert made.status_code == 200, made.text
    policy = admin.get("/v1/security/keys/tenants/policy")
    assert policy.json["policy"]["derived"] is True
    plain = admin.post("/v1/security/keys", {"name": "plain"})
    assert plain.status_code == 201
    refused = admin.post(
        "/v1/security/encrypt", {"key": "plain", "plaintext": text, "context": ctx}
    )
    assert (refused.status_code, refused.json["error"]["code"]) == (400, "context_not_allowed")
