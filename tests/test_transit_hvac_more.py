"""The Transit facade's hmac, sign, verify, random, hash, backup and restore, driven by the
real ``hvac`` client against a live ``qimem serve`` (attacks first). Errors must reach hvac
as ``InvalidRequest`` or ``Forbidden``, never ``UnexpectedError``."""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from typing import Any

import hvac
import pytest
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from hvac.exceptions import Forbidden, InvalidRequest
from identity_helpers import password_of
from transit_helpers import World, login, transit_world
from vault_helpers import vault_backup, vault_encrypt

pytestmark = pytest.mark.slow

EXTRA_ROLES = {
    "signer": ["keys:sign", "keys:verify", "keys:read"],
    "verifier": ["keys:verify", "keys:read"],
    "macer": ["keys:mac", "keys:verify", "keys:verify-mac", "keys:read"],
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _admin_post(world: World, path: str, body: dict[str, Any]) -> None:
    answer = requests.post(
        f"{world.url}/v1/auth/realms/master{path}",
        json=body,
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
        timeout=30,
    )
    assert answer.status_code in (200, 201, 204), answer.text


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with transit_world(tmp_path_factory.mktemp("transit-more")) as world:
        for role, permissions in EXTRA_ROLES.items():
            _admin_post(world, "/roles", {"name": role, "permissions": permissions})
            _admin_post(world, "/users", {"username": role, "password": password_of(role)})
            _admin_post(world, f"/users/{role}/roles", {"role": role})
            world.tokens[role] = login(world.url, "master", role, password_of(role))
        admin = world.client().secrets.transit
        admin.create_key("enc")
        for name, kind in (("ed", "ed25519"), ("p256", "ecdsa-p256"), ("p384", "ecdsa-p384")):
            admin.create_key(name, key_type=kind)
        admin.create_key("rsa", key_type="rsa-3072")
        # hvac's client-side type list lacks "hmac" (hvac#1135): a raw request creates it.
        assert world.raw("POST", "/v1/transit/keys/mac", json={"type": "hmac"}).ok
        yield world


def transit(world: World, who: str = "admin") -> Any:
    return world.client(who).secrets.transit


# ---- attacks ----------------------------------------------------------------------------


def test_permissions_of_sign_hmac_and_verify(world: World) -> None:
    with pytest.raises(Forbidden):
        transit(world, "crypto").sign_data("ed", b64(b"m"))
    with pytest.raises(Forbidden):
        transit(world, "crypto").generate_hmac("enc", b64(b"m"))
    with pytest.raises(Forbidden):
        transit(world, "signer").generate_hmac("enc", b64(b"m"))
    signature = transit(world, "signer").sign_data("ed", b64(b"m"))["data"]["signature"]
    verifier = transit(world, "verifier")
    assert verifier.verify_signed_data("ed", b64(b"m"), signature=signature)["data"]["valid"]
    tag = transit(world, "macer").generate_hmac("enc", b64(b"m"))["data"]["hmac"]
    with pytest.raises(Forbidden):  # keys:verify alone does not verify an HMAC
        verifier.verify_signed_data("enc", b64(b"m"), hmac=tag)
    batch = {"batch_input": [{"input": b64(b"m"), "hmac": tag}]}
    assert world.raw("POST", "/v1/transit/verify/enc", "verifier", json=batch).status_code == 403
    macer = transit(world, "macer")
    assert macer.verify_signed_data("enc", b64(b"m"), hmac=tag)["data"]["valid"] is True


def test_restore_is_realm_administration_and_other_realms_see_nothing(world: World) -> None:
    backup = vault_backup({1: os.urandom(32)}, name="stolen")
    with pytest.raises(Forbidden):
        transit(world, "crypto").restore_key(backup)
    with pytest.raises(InvalidRequest):
        transit(world, "intruder").sign_data("ed", b64(b"m"))
    with pytest.raises(InvalidRequest):
        transit(world, "intruder").generate_hmac("enc", b64(b"m"))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/transit/hmac/enc", {"input": "!!"}),
        ("POST", "/v1/transit/hmac/enc", {}),
        ("POST", "/v1/transit/hmac/enc", {"input": "", "algorithm": "md5"}),
        ("POST", "/v1/transit/hmac/enc", {"input": "", "key_version": "x"}),
        ("POST", "/v1/transit/hmac/ed", {"input": ""}),
        ("POST", "/v1/transit/sign/enc", {"input": ""}),
        ("POST", "/v1/transit/sign/ed", {"input": "", "context": "YQ=="}),
        ("POST", "/v1/transit/sign/p256", {"input": "", "marshaling_algorithm": "der"}),
        ("POST", "/v1/transit/sign/p384", {"input": "", "hash_algorithm": "sha2-256"}),
        ("POST", "/v1/transit/sign/rsa", {"input": "", "signature_algorithm": "pkcs1v15"}),
        ("POST", "/v1/transit/sign/rsa", {"input": "", "salt_length": "17"}),
        ("POST", "/v1/transit/sign/ed", {"input": "", "key_version": 7}),
        ("POST", "/v1/transit/verify/ed", {"input": ""}),
        ("POST", "/v1/transit/verify/ed", {"input": "", "signature": "vault:v1:", "hmac": "x"}),
        ("POST", "/v1/transit/verify/ed", {"input": "", "cmac": "vault:v1:AA=="}),
        ("POST", "/v1/transit/verify/ed", {"input": "", "signature": "v1:AAAA"}),
        ("POST", "/v1/transit/verify/enc", {"input": "", "hmac": "vault:v1:@@"}),
        ("POST", "/v1/transit/verify/enc", {"input": "", "hmac": "vault:v9:AAAA"}),
        ("POST", "/v1/transit/random", {"bytes": 0}),
        ("POST", "/v1/transit/random", {"bytes": 2**21}),
        ("POST", "/v1/transit/random", {"format": "base32"}),
        ("POST", "/v1/transit/random/seal", {}),
        ("POST", "/v1/transit/random/platform/-1", {}),
        ("POST", "/v1/transit/hash", {"input": "", "algorithm": "md5"}),
        ("POST", "/v1/transit/hash/sha1", {"input": ""}),
        ("POST", "/v1/transit/hash", {}),
        ("GET", "/v1/transit/backup/enc", None),
        ("POST", "/v1/transit/restore", {}),
        ("POST", "/v1/transit/restore/x1", {"backup": "not base64!"}),
        ("POST", "/v1/transit/restore/x2", {"backup": b64(b"{}")}),
        ("POST", "/v1/transit/restore", {"backup": vault_backup({1: os.urandom(32)}, kind=2)}),
        ("POST", "/v1/transit/restore/enc", {"backup": vault_backup({1: os.urandom(32)})}),
        (
            "POST",
            "/v1/transit/restore/d1",
            {"backup": vault_backup({1: os.urandom(32)}, derived=True, kdf=1)},
        ),
    ],
)
def test_bad_requests_are_400_in_vaults_shape(
    world: World, method: str, path: str, body: dict[str, Any] | None
) -> None:
    answer = world.raw(method, path, json=body)
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    errors = answer.json()["errors"]
    assert errors and all(isinstance(e, str) and "Traceback" not in e for e in errors)


# ---- hmac ------------------------------------------------------------------------------


def test_hmac_on_an_encryption_key_with_versions_and_min_versions(world: World) -> None:
    admin = transit(world)
    admin.create_key("hm")
    v1 = admin.generate_hmac("hm", b64(b"blind index"))["data"]["hmac"]
    assert v1.startswith("vault:v1:") and len(base64.b64decode(v1.split(":")[2])) == 32
    assert admin.verify_signed_data("hm", b64(b"blind index"), hmac=v1)["data"]["valid"]
    assert not admin.verify_signed_data("hm", b64(b"other"), hmac=v1)["data"]["valid"]
    assert admin.generate_hmac("hm", b64(b"blind index"))["data"]["hmac"] == v1  # stable
    admin.rotate_key("hm")
    v2 = admin.generate_hmac("hm", b64(b"blind index"))["data"]["hmac"]
    assert v2.startswith("vault:v2:") and v2 != v1
    assert admin.generate_hmac("hm", b64(b"blind index"), key_version=1)["data"]["hmac"] == v1
    long = admin.generate_hmac("hm", b64(b"x"), algorithm="sha2-512")["data"]["hmac"]
    assert len(base64.b64decode(long.split(":")[2])) == 64
    assert admin.verify_signed_data("hm", b64(b"x"), hmac=long, hash_algorithm="sha2-512")["data"][
        "valid"
    ]
    admin.update_key_configuration("hm", min_encryption_version=2)  # hvac: one at a time
    with pytest.raises(InvalidRequest):
        admin.generate_hmac("hm", b64(b"blind index"), key_version=1)
    assert admin.verify_signed_data("hm", b64(b"blind index"), hmac=v1)["data"]["valid"]
    admin.update_key_configuration("hm", min_decryption_version=2)
    with pytest.raises(InvalidRequest):  # v1 is below min_decryption_version: "too old"
        admin.verify_signed_data("hm", b64(b"blind index"), hmac=v1)


def test_hmac_keys_and_hmac_batches(world: World) -> None:
    admin = transit(world)
    tag = admin.generate_hmac("mac", b64(b"payload"))["data"]["hmac"]
    assert admin.verify_signed_data("mac", b64(b"payload"), hmac=tag)["data"]["valid"]
    answer = world.raw(
        "POST",
        "/v1/transit/hmac/enc/sha2-256",
        json={"batch_input": [{"input": b64(b"a"), "reference": "r1"}, {"input": "!!"}]},
    )
    assert answer.status_code == 400  # one item failed: Vault's status
    results = answer.json()["data"]["batch_results"]
    assert results[0]["reference"] == "r1" and results[0]["hmac"].startswith("vault:v1:")
    assert "error" in results[1]
    ok = world.raw("POST", "/v1/transit/hmac/enc", json={"batch_input": [{"input": b64(b"a")}] * 3})
    assert ok.status_code == 200
    assert {r["hmac"] for r in ok.json()["data"]["batch_results"]} == {results[0]["hmac"]}


# ---- sign and verify ---------------------------------------------------------------------


def _public_pem(world: World, key: str) -> Any:
    answer = requests.get(
        f"{world.url}/v1/security/keys/{key}/public",
        params={"format": "pem"},
        headers={"Authorization": f"Bearer {world.tokens['admin']}"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    return load_pem_public_key(answer.content)


def test_ed25519_signatures_are_bare_and_verify_with_a_third_party(world: World) -> None:
    admin = transit(world)
    signature = admin.sign_data("ed", b64(b"release 1.0"))["data"]["signature"]
    assert signature.startswith("vault:v1:")
    raw = base64.b64decode(signature.split(":")[2])
    assert len(raw) == 64
    _public_pem(world, "ed").verify(raw, b"release 1.0")  # cryptography, independently
    assert admin.verify_signed_data("ed", b64(b"release 1.0"), signature=signature)["data"]["valid"]
    assert not admin.verify_signed_data("ed", b64(b"release 2.0"), signature=signature)["data"][
        "valid"
    ]


def test_ecdsa_asn1_jws_prehashed_and_batches(world: World) -> None:
    admin = transit(world)
    der = admin.sign_data("p256", b64(b"m"), hash_algorithm="sha2-256")["data"]["signature"]
    assert admin.verify_signed_data("p256", b64(b"m"), signature=der)["data"]["valid"]
    jws = admin.sign_data("p256", b64(b"m"), marshaling_algorithm="jws")["data"]["signature"]
    assert len(base64.urlsafe_b64decode(jws.split(":")[2] + "==")) == 64  # r || s
    assert admin.verify_signed_data("p256", b64(b"m"), signature=jws, marshaling_algorithm="jws")[
        "data"
    ]["valid"]
    digest = hashlib.sha256(b"m").digest()
    pre = admin.sign_data("p256", b64(digest), prehashed=True)["data"]["signature"]
    assert admin.verify_signed_data("p256", b64(b"m"), signature=pre)["data"]["valid"]
    p384 = admin.sign_data("p384", b64(b"m"), hash_algorithm="sha2-384")["data"]["signature"]
    assert admin.verify_signed_data("p384", b64(b"m"), signature=p384)["data"]["valid"]
    batch = admin.sign_data(
        "ed", batch_input=[{"input": b64(b"a"), "reference": "x"}, {"input": b64(b"b")}]
    )["data"]["batch_results"]
    assert batch[0]["reference"] == "x" and all(r["signature"] for r in batch)
    checked = world.raw(
        "POST",
        "/v1/transit/verify/ed",
        json={
            "batch_input": [
                {"input": b64(b"a"), "signature": batch[0]["signature"]},
                {"input": b64(b"a"), "signature": batch[1]["signature"]},
            ]
        },
    )
    assert [r["valid"] for r in checked.json()["data"]["batch_results"]] == [True, False]


def test_rsa_pss_and_signatures_survive_rotation(world: World) -> None:
    admin = transit(world)
    sig = admin.sign_data("rsa", b64(b"doc"), signature_algorithm="pss")["data"]["signature"]
    admin.rotate_key("rsa")
    newer = admin.sign_data("rsa", b64(b"doc"))["data"]
    assert newer["key_version"] == 2
    for signature in (sig, newer["signature"]):
        assert admin.verify_signed_data("rsa", b64(b"doc"), signature=signature)["data"]["valid"]
    forged = sig.replace("vault:v1:", "vault:v2:")  # v1's signature relabelled: v2 rejects it
    assert not admin.verify_signed_data("rsa", b64(b"doc"), signature=forged)["data"]["valid"]


def test_unknown_fields_are_warned_and_hvacs_name_field_is_not(world: World) -> None:
    answer = world.raw("POST", "/v1/transit/sign/ed", json={"input": b64(b"m"), "colour": 1})
    assert answer.status_code == 200
    assert "colour" in answer.json()["warnings"][0]
    sig = answer.json()["data"]["signature"]
    verified = world.raw(
        "POST", "/v1/transit/verify/ed", json={"name": "ed", "input": b64(b"m"), "signature": sig}
    )
    assert verified.json()["data"]["valid"] is True and not verified.json()["warnings"]


# ---- random and hash ----------------------------------------------------------------------


def test_random_bytes(world: World) -> None:
    client = transit(world, "reader")  # no permission needed beyond a valid token
    text = client.generate_random_bytes(n_bytes=16, output_format="hex")["data"]["random_bytes"]
    assert len(bytes.fromhex(text)) == 16
    default = client.generate_random_bytes()["data"]["random_bytes"]
    assert len(base64.b64decode(default)) == 32
    for path, size in (("/random/64", 64), ("/random/platform/8", 8), ("/random/all", 32)):
        answer = world.raw("POST", "/v1/transit" + path, json={})
        assert len(base64.b64decode(answer.json()["data"]["random_bytes"])) == size
    with pytest.raises(Forbidden):
        hvac.Client(url=world.url, token="bad").secrets.transit.generate_random_bytes()


def test_hash(world: World) -> None:
    client = transit(world)
    data = b"hash me"
    assert client.hash_data(b64(data))["data"]["sum"] == hashlib.sha256(data).hexdigest()
    answer = client.hash_data(b64(data), algorithm="sha2-512", output_format="base64")
    assert answer["data"]["sum"] == b64(hashlib.sha512(data).digest())
    raw = world.raw("POST", "/v1/transit/hash/sha3-256", json={"input": b64(data)})
    assert raw.json()["data"]["sum"] == hashlib.sha3_256(data).hexdigest()


# ---- backup and restore --------------------------------------------------------------------


def test_backup_is_refused_by_design(world: World) -> None:
    with pytest.raises(InvalidRequest, match="never exports key material in plaintext"):
        transit(world).backup_key("enc")


def test_restore_a_vault_backup(world: World) -> None:
    key = os.urandom(32)
    assert transit(world).restore_key(vault_backup({1: key}), name="migrated").status_code == 204
    details = transit(world).read_key("migrated")["data"]
    assert details["latest_version"] == 1
    with pytest.raises(InvalidRequest, match="already exists"):
        transit(world).restore_key(vault_backup({1: key}), name="migrated", force=True)
    answer = world.raw(
        "POST", "/v1/transit/restore", json={"backup": vault_backup({1: key}, name="byname")}
    )
    assert answer.status_code == 204
    assert transit(world).read_key("byname")["data"]["latest_version"] == 1


def test_restored_vault_key_decrypts_and_rewraps_through_hvac(world: World) -> None:
    keys = {1: os.urandom(32), 2: os.urandom(32)}
    transit(world).restore_key(vault_backup(keys), name="legacy")
    client = transit(world)
    old = vault_encrypt(keys[1], 1, b"from vault", b"row-1")
    answer = client.decrypt_data("legacy", old, associated_data=b64(b"row-1"))
    assert answer["data"]["plaintext"] == b64(b"from vault")
    client.rotate_key("legacy")
    with pytest.raises(InvalidRequest):  # hvac's rewrap sends no associated_data
        client.rewrap_data("legacy", old)
    bare = vault_encrypt(keys[2], 2, b"no aad")
    rewrapped = client.rewrap_data("legacy", bare)["data"]["ciphertext"]
    assert rewrapped.startswith("vault:v3:")
    assert client.decrypt_data("legacy", rewrapped)["data"]["plaintext"] == b64(b"no aad")
    sealed = client.encrypt_data("legacy", b64(b"new"))["data"]["ciphertext"]
    assert sealed.startswith("vault:v3:")
    assert client.decrypt_data("legacy", sealed)["data"]["plaintext"] == b64(b"new")
