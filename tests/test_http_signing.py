"""/v1/security sign, verify, mac, verify-mac, public keys, random and hash (issue 16), and
the attacker's side of each: missing permissions, scoped grants, other realms, batches with
a foreign key, oversized and malformed bodies, audit records without message bytes.

Through the real Falcon app with authentication on (tokens minted for real users).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import make_app
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from falcon import testing
from identity_helpers import password_of, with_identity

from qimem import services
from qimem.app import AppContext
from qimem.services import identity as ids
from qimem.services.randomness import MAX_RANDOM_BYTES

S = "/v1/security"
MESSAGE = b"pay 100 to mallory; secret-marker-4711"
LIMIT = 64 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def active_id(app: AppContext, name: str, realm: str = "acme") -> str:
    active = services.show_key(app, name, realm=realm).active
    assert active is not None
    return active.key_id


@dataclass
class World:
    app: AppContext
    client: testing.TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def post(self, path: str, body: Any, who: str = "admin", **kw: Any) -> testing.Result:
        headers = {"Authorization": f"Bearer {self.tokens[who]}", **kw.pop("headers", {})}
        return self.client.simulate_post(S + path, json=body, headers=headers, **kw)

    def get(self, path: str, who: str = "admin", query: str = "") -> testing.Result:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return self.client.simulate_get(S + path, headers=headers, query_string=query)


def code(result: testing.Result) -> str:
    return result.json["error"]["code"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    from qimem.server.app import create_app

    app = with_identity(make_app("memory://", None))
    for realm in ("acme", "beta"):
        ids.create_realm(app, realm)
    for name, algorithm in (
        ("sig", "ed25519"),
        ("ec", "ecdsa-p256"),
        ("payroll-sig", "ed25519"),
        ("other-sig", "ed25519"),
        ("hm", "hmac-sha256"),
        ("aes", "aes-256-gcm"),
        ("payroll-a", "aes-256-gcm"),
        ("payroll-b", "aes-256-gcm"),
        ("other-a", "aes-256-gcm"),
    ):
        services.create_key(app, name=name, algorithm=algorithm, realm="acme")
    services.create_key(app, name="beta-sig", algorithm="ed25519", realm="beta")
    roles = {
        "verifier": ["keys:read", "keys:verify", "keys:verify-mac"],
        "signer": ["keys:read", "keys:sign", "keys:verify", "keys:mac"],
        "mover": ["crypto:rewrap", "crypto:decrypt", "crypto:encrypt"],
        "mover-no-decrypt": ["crypto:rewrap", "crypto:encrypt"],
        "helpdesk": ["users:admin", "keys:verify"],
    }
    for role, perms in roles.items():
        ids.create_role(app, "acme", role, perms)
    users = {
        "boss": [("admin", "")],
        "verifier": [("verifier", "")],
        "signer": [("signer", "")],
        "payroll": [("signer", "payroll-*"), ("mover", "payroll-*")],
        "keyman": [("key-manager", "")],
        "mover": [("mover-no-decrypt", "")],
        "helpdesk": [("helpdesk", "")],
    }
    for user, grants in users.items():
        ids.add_user(app, "acme", user, password_of(user))
        for role, scope in grants:
            ids.grant_role(app, "acme", user, role, scope)
    ids.add_user(app, "beta", "intruder", password_of("intruder"), ["admin"])
    world = World(app, testing.TestClient(create_app(app, max_body_bytes=LIMIT)))
    for user in users:
        world.tokens[user] = ids.mint_token(app, "acme", user).access_token
    world.tokens["admin"] = world.tokens["boss"]
    world.tokens["intruder"] = ids.mint_token(app, "beta", "intruder").access_token
    yield world
    ids.close_identity(app)
    app.close()


def sign(world: World, key: str = "sig", who: str = "admin", **extra: Any) -> testing.Result:
    return world.post("/sign", {"key": key, "message": b64(MESSAGE), **extra}, who)


# ---- round trips ------------------------------------------------------------------------


def test_sign_then_verify_and_a_changed_message_is_invalid(world: World) -> None:
    signed = sign(world)
    assert signed.status_code == 200, signed.text
    assert signed.json["algorithm"] == "ed25519" and signed.json["version"] == 1
    body = {"key": "sig", "message": b64(MESSAGE), "signature": signed.json["signature"]}
    ok = world.post("/verify", body)
    assert ok.status_code == 200 and ok.json["valid"] is True
    assert ok.json["key_id"] == signed.json["key_id"]
    bad = world.post("/verify", {**body, "message": b64(MESSAGE + b"!")})
    assert bad.status_code == 200 and bad.json == {"valid": False, "key_id": None, "version": None}
    other = world.post("/verify", {**body, "key": "other-sig"})  # another key's signature
    assert other.status_code == 200 and other.json["valid"] is False


def test_raw_signature_verifies_with_the_exported_public_key(world: World) -> None:
    raw = base64.b64decode(sign(world, raw=True).json["signature"])
    assert len(raw) == 64  # a bare Ed25519 signature, no qimem header
    pem = world.get("/keys/sig/public", query="format=pem")
    assert pem.status_code == 200 and pem.headers["content-type"] == "application/x-pem-file"
    public = load_pem_public_key(pem.text.encode())
    assert isinstance(public, Ed25519PublicKey)
    public.verify(raw, MESSAGE)  # raises if not valid
    body = {"key": "sig", "message": b64(MESSAGE), "signature": b64(raw), "raw": True}
    assert world.post("/verify", body).json["valid"] is True


def test_ecdsa_jws_marshaling_gives_r_and_s(world: World) -> None:
    jws = sign(world, "ec", marshaling="jws", raw=True)
    assert len(base64.b64decode(jws.json["signature"])) == 64
    asn1 = sign(world, "ec", raw=True)
    assert base64.b64decode(asn1.json["signature"])[0] == 0x30  # DER SEQUENCE
    for marshaling, signed in (("jws", jws), ("asn1", asn1)):
        body = {"key": "ec", "message": b64(MESSAGE), "signature": signed.json["signature"]}
        body |= {"raw": True, "marshaling": marshaling}
        assert world.post("/verify", body).json["valid"] is True
    assert code(sign(world, "ec", marshaling="der")) == "invalid_value"


def test_prehashed_ecdsa_verifies_against_the_message(world: World) -> None:
    digest = hashlib.sha256(MESSAGE).digest()
    signed = world.post("/sign", {"key": "ec", "message": b64(digest), "prehashed": True})
    assert signed.status_code == 200, signed.text
    body = {"key": "ec", "message": b64(MESSAGE), "signature": signed.json["signature"]}
    assert world.post("/verify", body).json["valid"] is True
    assert world.post("/verify", {**body, "message": b64(digest)}).json["valid"] is False
    refused = sign(world, "sig", prehashed=True)  # Ed25519 signs messages, not digests
    assert refused.status_code == 400, refused.text


def test_mac_then_verify_mac(world: World) -> None:
    tagged = world.post("/mac", {"key": "hm", "data": b64(MESSAGE)})
    assert tagged.status_code == 200 and tagged.json["algorithm"] == "hmac-sha256"
    body = {"key": "hm", "data": b64(MESSAGE), "tag": tagged.json["tag"]}
    assert world.post("/verify-mac", body).json["valid"] is True
    assert world.post("/verify-mac", {**body, "data": b64(b"x")}).json["valid"] is False
    raw = world.post("/mac", {"key": "hm", "data": b64(MESSAGE), "raw": True})
    assert len(base64.b64decode(raw.json["tag"])) == 32


def test_batches_answer_per_item(world: World) -> None:
    """A batch with another realm's key and a malformed item: those items fail, the
    others are signed."""
    items = [
        {"key": "sig", "message": b64(b"one")},
        {"key_id": active_id(world.app, "beta-sig", "beta"), "message": b64(b"two")},
        {"key": "sig", "message": "not base64!"},
        {"key": "sig", "message": b64(b"three")},
    ]
    result = world.post("/sign", {"items": items})
    assert result.status_code == 200, result.text
    answers = result.json["items"]
    assert [("error" in a) for a in answers] == [False, True, True, False]
    assert answers[1]["error"]["code"] == "not_found"
    assert answers[2]["error"]["code"] == "invalid_base64"
    checks = [
        {"key": "sig", "message": b64(m), "signature": a["signature"]}
        for m, a in ((b"one", answers[0]), (b"three", answers[3]), (b"four", answers[3]))
    ]
    verified = world.post("/verify", {"items": checks}).json["items"]
    assert [v["valid"] for v in verified] == [True, True, False]


def test_public_key_formats_and_jwks_after_rotation(world: World) -> None:
    services.create_key(world.app, name="rot-sig", algorithm="ed25519", realm="acme")
    first = world.get("/keys/rot-sig/public").json
    services.rotate_key(world.app, "rot-sig", realm="acme")
    second = world.get("/keys/rot-sig/public").json
    assert second["version"] == 2 and second["pem"] != first["pem"]
    jwk = world.get("/keys/rot-sig/public", query="format=jwk").json
    assert jwk["kty"] == "OKP" and jwk["kid"] == second["key_id"]
    jwks = world.get("/keys/rot-sig/public", query="format=jwks").json
    assert [k["kid"] for k in jwks["keys"]] == [first["key_id"], second["key_id"]]
    for key in jwks["keys"]:
        assert not {"d", "p", "q", "k", "priv", "seed"} & set(key)  # never a private member
    old = world.get("/keys/rot-sig/public", query="version=1").json
    assert old["key_id"] == first["key_id"]
    for query, expected in (
        ("format=x", "invalid_value"),
        ("version=0", "invalid_value"),
        ("version=1.5", "invalid_value"),
        ("format=jwks&version=1", "invalid_request"),
    ):
        answer = world.get("/keys/rot-sig/public", query=query)
        assert answer.status_code == 400 and code(answer) == expected, query
    assert world.get("/keys/rot-sig/public", query="version=9").status_code == 404
    assert code(world.get("/keys/hm/public")) == "wrong_purpose"  # a MAC key has none


def test_random_and_hash(world: World) -> None:
    random = world.post("/random", {"bytes": 32}, "verifier")  # any valid token
    assert len(base64.b64decode(random.json["random"])) == 32
    assert random.json != world.post("/random", {"bytes": 32}).json
    hashed = world.post("/hash", {"data": b64(b"abc"), "algorithm": "sha3-256"}, "verifier")
    assert hashed.json["algorithm"] == "sha3-256"
    assert base64.b64decode(hashed.json["digest"]).hex().startswith("3a985da74fe225b2")
    default = world.post("/hash", {"data": b64(b"abc")}).json
    assert default["algorithm"] == "sha2-256"
    assert base64.b64decode(default["digest"]).hex().startswith("ba7816bf")
    assert code(world.post("/hash", {"data": b64(b"abc"), "algorithm": "md5"})) == (
        "unsupported_hash"
    )


@pytest.mark.parametrize("n", [0, -1, MAX_RANDOM_BYTES + 1, 10**30, "16", True, 1.5, None])
def test_random_size_out_of_range_is_400(world: World, n: object) -> None:
    result = world.post("/random", {"bytes": n})
    assert result.status_code == 400, result.text
    assert code(result) in ("invalid_size", "invalid_type", "missing_field")


# ---- attacks ----------------------------------------------------------------------------


def test_verify_permission_cannot_sign(world: World) -> None:
    """keys:verify without keys:sign: verifying works, signing and MACs are 403."""
    signature = sign(world).json["signature"]
    body = {"key": "sig", "message": b64(MESSAGE), "signature": signature}
    assert world.post("/verify", body, "verifier").json["valid"] is True
    assert sign(world, who="verifier").status_code == 403
    batch = world.post("/sign", {"items": [{"key": "sig", "message": b64(b"x")}]}, "verifier")
    assert batch.status_code == 403
    assert world.post("/mac", {"key": "hm", "data": b64(b"x")}, "verifier").status_code == 403
    # and the signer, with keys:verify too, holds no verify-mac
    body = {"key": "hm", "data": b64(b"x"), "tag": b64(b"t" * 32)}
    assert world.post("/verify-mac", body, "signer").status_code == 403
    assert world.post("/verify-mac", body, "verifier").status_code == 200


def test_scoped_grant_signs_only_matching_keys(world: World) -> None:
    assert sign(world, "payroll-sig", "payroll").status_code == 200
    refused = sign(world, "other-sig", "payroll")
    assert refused.status_code == 403 and code(refused) == "forbidden"
    other_id = active_id(world.app, "other-sig")
    assert (
        world.post("/sign", {"key_id": other_id, "message": b64(b"x")}, "payroll").status_code
        == 403
    )  # a key_id of a key outside the scope
    mixed = [{"key": "payroll-sig", "message": b64(b"a")}, {"key": "other-sig", "message": "YQ=="}]
    assert world.post("/sign", {"items": mixed}, "payroll").status_code == 403  # all or none
    assert world.get("/keys/other-sig/public", "payroll").status_code == 403
    assert world.get("/keys/payroll-sig/public", "payroll").status_code == 200


def test_another_realms_key_is_404(world: World) -> None:
    beta_id = active_id(world.app, "beta-sig", "beta")
    for result in (
        world.post("/sign", {"key_id": beta_id, "message": b64(b"x")}),
        world.post("/sign", {"key": "beta-sig", "message": b64(b"x")}),
        world.get(f"/keys/{beta_id}/public"),
        world.get("/keys/beta-sig/public", query="format=jwks"),
    ):
        assert result.status_code == 404, result.text
    # a beta admin naming acme by header: the realm does not exist for him
    acme = {"X-Qimem-Realm": "acme"}
    asked = world.post("/sign", {"key": "sig", "message": "YQ=="}, "intruder", headers=acme)
    assert asked.status_code == 404 and code(asked) == "realm_not_found"


def test_oversized_and_malformed_bodies(world: World) -> None:
    huge = world.post("/sign", {"key": "sig", "message": b64(b"x" * LIMIT)})
    assert huge.status_code == 413 and code(huge) == "payload_too_large"
    for body, expected in (
        ({"key": "sig", "message": "%%%"}, "invalid_base64"),
        ({"key": "sig", "message": "YQ"}, "invalid_base64"),  # unpadded
        ({"key": "sig", "message": "YQ==", "signature": "x"}, "unknown_field"),
        ({"key": "sig"}, "missing_field"),
        ({"message": "YQ=="}, "missing_field"),
        ({"key": "sig", "message": "YQ==", "raw": "yes"}, "invalid_type"),
        ({"key": "aes", "message": "YQ=="}, "wrong_purpose"),
        ({"key": "hm", "message": "YQ=="}, "wrong_purpose"),
    ):
        result = world.post("/sign", body)
        assert result.status_code == 400, (body, result.text)
        assert code(result) == expected, (body, result.text)
    tag = {"key": "hm", "data": "YQ==", "tag": "!"}
    assert code(world.post("/verify-mac", tag)) == "invalid_base64"
    garbage = {"key": "sig", "message": "YQ==", "signature": b64(b"\x00" * 3)}
    assert world.post("/verify", garbage).json["valid"] is False  # malformed: invalid, no 500


def test_no_escalation_to_signing(world: World) -> None:
    """A users:admin holding keys:verify cannot make a role with keys:sign, nor grant one."""
    headers = {"Authorization": f"Bearer {world.tokens['helpdesk']}"}
    roles = "/v1/auth/realms/acme/roles"

    def make(name: str, perms: list[str]) -> testing.Result:
        body = {"name": name, "permissions": perms}
        return world.client.simulate_post(roles, json=body, headers=headers)

    refused = make("forger", ["keys:verify", "keys:sign"])
    assert refused.status_code == 403 and code(refused) == "escalation_denied"
    assert make("checker", ["keys:verify"]).status_code == 201
    grant = world.client.simulate_post(
        "/v1/auth/realms/acme/users/verifier/roles", json={"role": "signer"}, headers=headers
    )
    assert grant.status_code == 403 and code(grant) == "escalation_denied"


def test_audit_names_the_key_and_holds_no_message_bytes(world: World) -> None:
    signed = sign(world, "sig", "signer")
    body = {"key": "sig", "message": b64(MESSAGE), "signature": b64(b"\x01" * 90)}
    assert world.post("/verify", body, "signer").json["valid"] is False
    world.post("/mac", {"key": "hm", "data": b64(MESSAGE)}, "signer")
    ident = ids.identity(world.app)
    ident.audit.flush()
    records = ident.audit_events("acme", limit=50, actor="signer@acme")
    by_action = {r.action: r for r in records}
    sig_id = active_id(world.app, "sig")
    assert by_action["crypto.sign"].target == signed.json["key_id"] == sig_id
    assert by_action["crypto.verify"].target == "sig"  # an invalid signature names the key asked
    assert by_action["crypto.mac"].target.count("-") == 4  # the MAC key's key_id
    dumped = json.dumps([r.to_dict() for r in records])
    for secret in (b64(MESSAGE), "secret-marker-4711", signed.json["signature"][:24]):
        assert secret not in dumped


# ---- rewrap to a target key, data keys without plaintext ---------------------------------


def _seal(world: World, key: str) -> str:
    return b64(services.encrypt(world.app, key, b"salary", realm="acme").envelope)


def test_rewrap_to_a_target_needs_decrypt_on_the_source_and_encrypt_on_the_target(
    world: World,
) -> None:
    envelope = _seal(world, "payroll-a")
    moved = world.post("/rewrap", {"envelope": envelope, "target": "payroll-b"}, "payroll")
    assert moved.status_code == 200, moved.text
    opened = services.decrypt(world.app, base64.b64decode(moved.json["envelope"]), realm="acme")
    assert opened.plaintext == b"salary"
    assert moved.json["key_id"] == active_id(world.app, "payroll-b")
    # the scoped mover cannot move payroll data to a key outside payroll-*
    out = world.post("/rewrap", {"envelope": envelope, "target": "other-a"}, "payroll")
    assert out.status_code == 403 and "crypto:encrypt" in out.json["error"]["message"]
    # crypto:rewrap alone (key-manager) re-seals in place, but moves nothing
    assert world.post("/rewrap", {"envelope": envelope}, "keyman").status_code == 200
    refused = world.post("/rewrap", {"envelope": envelope, "target": "aes"}, "keyman")
    assert refused.status_code == 403 and "crypto:decrypt" in refused.json["error"]["message"]
    # rewrap + encrypt everywhere, but no decrypt: moving would be reading
    assert world.post("/rewrap", {"envelope": envelope, "target": "aes"}, "mover").status_code == (
        403
    )


def test_rewrap_batch_answers_per_item(world: World) -> None:
    items = [
        {"envelope": _seal(world, "aes"), "target": "payroll-a"},
        {"envelope": b64(b"not an envelope at all")},
        {"envelope": _seal(world, "aes")},
        {"envelope": _seal(world, "aes"), "target": "hm"},  # a MAC key: wrong purpose
    ]
    answers = world.post("/rewrap", {"items": items}).json["items"]
    assert "envelope" in answers[0] and "envelope" in answers[2]
    assert "error" in answers[1] and answers[3]["error"]["code"] == "wrong_purpose"


def test_datakey_wrapped_only_and_aad(world: World) -> None:
    wrapped = world.post("/datakey", {"key": "aes", "wrapped_only": True, "aad": b64(b"ctx")})
    assert wrapped.status_code == 200 and wrapped.json["plaintext_key"] is None
    blob = base64.b64decode(wrapped.json["wrapped_key"])
    opened = services.decrypt(world.app, blob, aad=b"ctx", realm="acme")
    assert len(opened.plaintext) == 32
    denied = world.post("/decrypt", {"envelope": wrapped.json["wrapped_key"]})
    assert denied.status_code == 422  # the aad is needed
    full = world.post("/datakey", {"key": "aes"}).json
    assert len(base64.b64decode(full["plaintext_key"])) == 32


# ---- answers match the OpenAPI document ---------------------------------------------------


def _conforms(path: str, method: str, result: testing.Result) -> None:
    """``result``'s body validates against the document's schema for its status."""
    from jsonschema import Draft202012Validator

    from qimem.server.ops import openapi_document

    doc = openapi_document()
    response = doc["paths"][path][method]["responses"][str(result.status_code)]
    if "$ref" in response:
        response = doc["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    media = result.headers["content-type"].split(";")[0]
    schema = response["content"][media]["schema"]
    body = result.json if media == "application/json" else result.text
    Draft202012Validator({**schema, "components": doc["components"]}).validate(body)


def test_answers_conform_to_the_openapi_document(world: World) -> None:
    signed = sign(world)
    checks = [
        ("/sign", signed),
        ("/sign", sign(world, raw=True)),
        ("/sign", world.post("/sign", {"items": [{"key": "sig", "message": "YQ=="}, {}]})),
        ("/sign", sign(world, "aes")),
        ("/verify", world.post("/verify", {"key": "sig", "message": "YQ==", "signature": "AA=="})),
        (
            "/verify",
            world.post(
                "/verify",
                {"key": "sig", "message": b64(MESSAGE), "signature": signed.json["signature"]},
            ),
        ),
        ("/mac", world.post("/mac", {"key": "hm", "data": "YQ=="})),
        (
            "/verify-mac",
            world.post("/verify-mac", {"items": [{"key": "hm", "data": "YQ==", "tag": "AA=="}]}),
        ),
        ("/random", world.post("/random", {"bytes": 8})),
        ("/random", world.post("/random", {"bytes": 0})),
        ("/hash", world.post("/hash", {"data": "YQ=="})),
        ("/datakey", world.post("/datakey", {"key": "aes", "wrapped_only": True})),
        ("/rewrap", world.post("/rewrap", {"items": [{"envelope": _seal(world, "aes")}, {}]})),
    ]
    for path, result in checks:
        assert result.status_code < 500, result.text
        _conforms(S + path, "post", result)
    public = S + "/keys/{key_id}/public"
    for query in ("", "format=pem", "format=jwk", "format=jwks", "format=bad"):
        _conforms(public, "get", world.get("/keys/ec/public", query=query))
    _conforms(public, "get", world.get("/keys/hm/public"))
