"""Red team, issue 16, over HTTP: the attacker's requests against sign, verify, mac,
verify-mac, public keys, random, hash, rewrap with a target, and import.

Through the real Falcon app with authentication on. Escalation: a grant scoped to
``payroll-*`` naming another key by lineage_id or key_id, hiding it in a batch, or
borrowing its signature under an allowed key; a ``crypto:rewrap``-only key manager slipping
a target into one batch item. Cross-realm: a signature naming another realm's version is
answered like any bad signature. Crafted backups: 400, never a 201 that makes the key a
500 for good. Limits and malformed options: one clear 400.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import make_app
from falcon import testing
from identity_helpers import password_of, with_identity

from qimem import backup, services
from qimem.app import AppContext
from qimem.server.media import MAX_BATCH_ITEMS
from qimem.services import identity as ids
from qimem.services import signing

S = "/v1/security"
MESSAGE = b"transfer 5000 to eve; secret-marker-5521"
PASSPHRASE = "correct horse battery staple 42!"
KDF = {"time_cost": 1, "memory_kib": 8192, "parallelism": 1}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class World:
    app: AppContext
    client: testing.TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def post(self, path: str, body: Any, who: str, **kw: Any) -> testing.Result:
        headers = {"Authorization": f"Bearer {self.tokens[who]}", **kw.pop("headers", {})}
        return self.client.simulate_post(S + path, json=body, headers=headers, **kw)

    def get(self, path: str, who: str, query: str = "") -> testing.Result:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return self.client.simulate_get(S + path, headers=headers, query_string=query)


def ids_of(app: AppContext, name: str, realm: str = "acme") -> tuple[str, str]:
    """(lineage_id, active key_id) of ``name``."""
    details = services.show_key(app, name, realm=realm)
    assert details.active is not None
    return details.lineage_id, details.active.key_id


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    from qimem.server.app import create_app

    app = with_identity(make_app("memory://", None))
    for realm in ("acme", "beta"):
        ids.create_realm(app, realm)
    for name, algorithm in (
        ("payroll-sig", "ed25519"),
        ("other-sig", "ed25519"),
        ("payroll-hm", "hmac-sha256"),
        ("other-hm", "hmac-sha256"),
        ("payroll-a", "aes-256-gcm"),
        ("other-a", "aes-256-gcm"),
        ("payroll-det", "aes-256-siv"),
        ("ec", "ecdsa-p256"),
    ):
        services.create_key(app, name=name, algorithm=algorithm, realm="acme")
    services.create_key(app, name="payroll-sig", algorithm="ed25519", realm="beta")
    ids.create_role(
        app,
        "acme",
        "clerk",
        ["keys:read", "keys:sign", "keys:verify", "keys:mac", "keys:verify-mac"]
        + ["crypto:encrypt", "crypto:decrypt", "crypto:rewrap"],
    )
    users = {"payroll": [("clerk", "payroll-*")], "keyman": [("key-manager", "")]}
    for user, grants in users.items():
        ids.add_user(app, "acme", user, password_of(user))
        for role, scope in grants:
            ids.grant_role(app, "acme", user, role, scope)
    ids.add_user(app, "acme", "boss", password_of("boss"), ["admin"])
    ids.add_user(app, "beta", "intruder", password_of("intruder"), ["admin"])
    world = World(app, testing.TestClient(create_app(app, max_body_bytes=256 * 1024)))
    for user in (*users, "boss"):
        world.tokens[user] = ids.mint_token(app, "acme", user).access_token
    world.tokens["intruder"] = ids.mint_token(app, "beta", "intruder").access_token
    yield world
    ids.close_identity(app)
    app.close()


def _signature(world: World, key: str, realm: str = "acme") -> str:
    return b64(signing.sign(world.app, key, MESSAGE, realm=realm).signature)


# ---- escalation -------------------------------------------------------------------------


def test_a_scoped_grant_never_reaches_another_key_by_lineage_or_key_id(world: World) -> None:
    lineage, key_id = ids_of(world.app, "other-sig")
    hm_lineage, _ = ids_of(world.app, "other-hm")
    signature = _signature(world, "other-sig")
    for path, body in (
        ("/sign", {"key": lineage, "message": b64(MESSAGE)}),
        ("/sign", {"key": key_id, "message": b64(MESSAGE)}),
        ("/verify", {"key": lineage, "message": b64(MESSAGE), "signature": signature}),
        ("/mac", {"key": hm_lineage, "data": b64(MESSAGE)}),
        ("/verify-mac", {"key": hm_lineage, "data": b64(MESSAGE), "tag": signature}),
        # hidden behind an allowed item of a batch
        (
            "/verify",
            {
                "items": [
                    {"key": "payroll-sig", "message": "YQ==", "signature": signature},
                    {"key": lineage, "message": b64(MESSAGE), "signature": signature},
                ]
            },
        ),
    ):
        refused = world.post(path, body, "payroll")
        assert refused.status_code == 403, (path, refused.text)
    assert world.get(f"/keys/{lineage}/public", "payroll").status_code == 403
    assert world.get(f"/keys/{key_id}/public", "payroll", "format=jwks").status_code == 403


def test_another_keys_signature_under_an_allowed_key_is_just_invalid(world: World) -> None:
    """The header names other-sig's version: under payroll-sig it is invalid, the same
    answer as a tampered signature (no way to learn whether other-sig signed it)."""
    foreign = _signature(world, "other-sig")
    mine = base64.b64decode(_signature(world, "payroll-sig"))
    tampered = b64(mine[:-1] + bytes([mine[-1] ^ 1]))
    spliced = b64(mine[:26] + base64.b64decode(foreign)[26:])
    answers = [
        world.post(
            "/verify",
            {"key": "payroll-sig", "message": b64(MESSAGE), "signature": blob},
            "payroll",
        )
        for blob in (foreign, tampered, spliced)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert (
        answers[0].json
        == answers[1].json
        == answers[2].json
        == {
            "valid": False,
            "key_id": None,
            "version": None,
        }
    )


def test_a_target_smuggled_into_one_batch_item_is_refused(world: World) -> None:
    payroll_env = b64(services.encrypt(world.app, "payroll-a", b"salary", realm="acme").envelope)
    other_env = b64(services.encrypt(world.app, "other-a", b"secret", realm="acme").envelope)
    other_lineage, other_key = ids_of(world.app, "other-a")
    # the key manager (crypto:rewrap realm-wide, no decrypt/encrypt) re-seals in place ...
    in_place = world.post("/rewrap", {"items": [{"envelope": other_env}]}, "keyman")
    assert in_place.status_code == 200 and "envelope" in in_place.json["items"][0]
    # ... but one targeted item among in-place ones is refused, by name, lineage or key_id
    for target in ("payroll-a", other_lineage, other_key):
        items = [{"envelope": other_env}, {"envelope": other_env, "target": target}]
        refused = world.post("/rewrap", {"items": items}, "keyman")
        assert refused.status_code == 403, (target, refused.text)
    # the payroll clerk cannot move payroll data out, nor other data in, by any reference
    for envelope, target in (
        (payroll_env, other_lineage),
        (payroll_env, other_key),
        (other_env, "payroll-a"),
    ):
        items = [{"envelope": payroll_env, "target": "payroll-det"}]
        items.append({"envelope": envelope, "target": target})
        refused = world.post("/rewrap", {"items": items}, "payroll")
        assert refused.status_code == 403, (target, refused.text)
    # what is allowed still works: payroll-a to the deterministic payroll-det
    moved = world.post("/rewrap", {"envelope": payroll_env, "target": "payroll-det"}, "payroll")
    assert moved.status_code == 200, moved.text


# ---- cross-realm ------------------------------------------------------------------------


def test_a_signature_from_another_realm_is_invalid_here_and_its_key_unknown(world: World) -> None:
    """beta has a payroll-sig too: its signatures do not verify under acme's payroll-sig,
    and acme's answer is the one any bad signature gets."""
    beta_signature = _signature(world, "payroll-sig", "beta")
    asked = {"key": "payroll-sig", "message": b64(MESSAGE), "signature": beta_signature}
    answer = world.post("/verify", asked, "payroll")
    assert answer.status_code == 200 and answer.json["valid"] is False
    assert world.post("/verify", asked, "intruder").json["valid"] is True  # in its own realm
    acme_lineage, acme_key = ids_of(world.app, "payroll-sig")
    for ref in (acme_lineage, acme_key):
        assert world.get(f"/keys/{ref}/public", "intruder").status_code == 404
        body = {"key": ref, "message": b64(MESSAGE), "signature": beta_signature}
        assert world.post("/verify", body, "intruder").status_code == 404


# ---- crafted imports --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("key_id", "not-a-uuid"), ("version", 2**33), ("encryptions", -(2**40))],
)
def test_a_crafted_backup_is_400_and_leaves_nothing(world: World, field: str, value: Any) -> None:
    """A beta administrator seals a backup of his own with an id, version or usage count
    the store never makes: 400 invalid_backup, nothing restored (before: 201, then every
    sign with the key was a 500)."""
    source = make_app("memory://", None)
    try:
        services.create_key(source, name=f"crafted-{field}", algorithm="ed25519")
        sealed = backup.export_keys(source, [f"crafted-{field}"], PASSPHRASE, kdf=KDF)
        payload = copy.deepcopy(backup.open_backup(sealed, PASSPHRASE))
    finally:
        source.close()
    payload["lineages"][0]["versions"][0][field] = value
    crafted = backup.seal(payload, PASSPHRASE, KDF)
    body = {"backup": b64(crafted), "passphrase": PASSPHRASE}
    answer = world.post("/import", body, "intruder")
    assert answer.status_code == 400, answer.text
    assert answer.json["error"]["code"] == "invalid_backup"
    signed = world.post("/sign", {"key": f"crafted-{field}", "message": "YQ=="}, "intruder")
    assert signed.status_code == 404


# ---- limits and malformed options --------------------------------------------------------


def test_limits_and_odd_options_are_one_clear_400(world: World) -> None:
    item = {"key": "payroll-hm", "data": "YQ=="}
    over = world.post("/mac", {"items": [item] * (MAX_BATCH_ITEMS + 1)}, "payroll")
    assert over.status_code == 400 and over.json["error"]["code"] == "invalid_value"
    for path, body in (
        ("/random", {"bytes": 1.5}),
        ("/random", {"bytes": "16"}),
        ("/random", {"bytes": True}),
        ("/random", {"bytes": 10**30}),
        ("/hash", {"data": "YQ==", "algorithm": "md5"}),
        ("/hash", {"data": "YQ==", "algorithm": "SHA2-256"}),
        ("/sign", {"key": "ec", "message": b64(b"\0" * 31), "prehashed": True}),
        ("/sign", {"key": "ec", "message": b64(b"\0" * 64), "prehashed": True}),
        ("/sign", {"key": "payroll-sig", "message": "YQ==", "prehashed": True}),
        ("/sign", {"key": "ec", "message": "YQ==", "marshaling": "der"}),
        ("/sign", {"key": "payroll-det", "message": "YQ=="}),
        ("/mac", {"key": "payroll-sig", "data": "YQ=="}),
        ("/verify", {"key": "ec", "message": "YQ==", "signature": "YQ==", "version": 0}),
        ("/verify", {"key": "ec", "message": "YQ==", "signature": "YQ==", "version": 1}),
    ):
        answer = world.post(path, body, "boss")
        assert answer.status_code == 400, (path, body, answer.text)
        assert "secret-marker" not in answer.text
    for query in ("version=abc", "version=-1", "version=99999999999", "format=der"):
        answer = world.get("/keys/payroll-sig/public", "boss", query)
        assert answer.status_code == 400, (query, answer.text)
    for name in ("payroll-hm", "payroll-a", "payroll-det"):
        answer = world.get(f"/keys/{name}/public", "boss")
        assert answer.status_code == 400 and answer.json["error"]["code"] == "wrong_purpose"
    huge = world.post(
        "/verify",
        {"key": "ec", "message": "YQ==", "signature": b64(b"\x30" * 150_000)},
        "boss",
    )
    assert huge.status_code == 200 and huge.json["valid"] is False


# A batch answer names no key at its top level: the audit record must still name the
# keys it used (red team finding, fixed in server/auth_middleware.py _batch_keys).
@pytest.fixture
def served_batch() -> Iterator[tuple[AppContext, testing.TestClient, str]]:
    from qimem.server.app import create_app

    app = with_identity(make_app("memory://", None))
    ids.create_realm(app, "acme")
    for name in ("payroll-1", "payroll-2"):
        services.create_key(app, name=name, algorithm="ed25519", realm="acme")
    ids.add_user(app, "acme", "boss", password_of("boss"), ["admin"])
    token = ids.mint_token(app, "acme", "boss").access_token
    yield app, testing.TestClient(create_app(app)), token
    ids.close_identity(app)
    app.close()


def test_a_batch_audit_record_names_the_keys_it_used(
    served_batch: tuple[AppContext, testing.TestClient, str],
) -> None:
    app, client, token = served_batch
    items = [{"key": "payroll-1", "message": "YQ=="}, {"key": "payroll-2", "message": "YQ=="}]
    answer = client.simulate_post(
        "/v1/security/sign", json={"items": items}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200
    used = {item["key_id"] for item in answer.json["items"]}
    identity = ids.identity(app)
    identity.audit.flush()
    (record,) = identity.audit_events("acme", limit=10, action="crypto.sign")
    named = {record.target, *record.to_dict().get("detail", {}).get("key_ids", [])}
    assert used <= named, record.to_dict()
