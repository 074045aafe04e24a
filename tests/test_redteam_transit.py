"""Red team (issue 17): the Transit facade attacked through a live ``qimem serve`` -
lenient integer fields, crafted Vault backups, realm switching, token headers and the
vault-layout lineages. Every bad input must be a 400 (or 403), never a 500."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from transit_helpers import World, transit_world
from vault_helpers import vault_backup, vault_encrypt

pytestmark = pytest.mark.slow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with transit_world(tmp_path_factory.mktemp("redteam-transit")) as world:
        for name in ("rt-enc", "team-a", "other"):
            answer = world.raw("POST", f"/v1/transit/keys/{name}", json={})
            assert answer.status_code in (200, 204), answer.text
        yield world


@pytest.mark.parametrize("value", ["\u00b2", "--1", "-\u00b9", "\u0663"])
def test_lenient_integers_that_int_cannot_read_are_400(world: World, value: str) -> None:
    # str.isdigit() is true for superscripts and other unicode digits, and lstrip("-")
    # hides a doubled sign: int() then raised ValueError (500).
    for path, body in (
        ("/v1/transit/encrypt/rt-enc", {"plaintext": b64(b"x"), "key_version": value}),
        ("/v1/transit/datakey/plaintext/rt-enc", {"bits": value}),
        ("/v1/transit/hmac/rt-enc", {"input": b64(b"x"), "key_version": value}),
    ):
        answer = world.raw("POST", path, "crypto", json=body)
        assert answer.status_code in (400, 403), (path, answer.status_code, answer.text)
        assert "errors" in answer.json()


def _backup_doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(vault_backup({1: os.urandom(32)}, as_json=True))
    for path, value in changes.items():
        where = doc
        *parents, last = path.split("__")
        for part in parents:
            where = where[part]
        where[last] = value
    return doc


CRAFTED = {
    "archive-list": _backup_doc(archived_keys=[1, 2]),
    "archive-string": _backup_doc(archived_keys="x"),
    "archive-keys-dict": _backup_doc(archived_keys={"keys": {"1": {}}}),
    "label-superscript": _backup_doc(policy__keys={"\u00b9": {"key": b64(os.urandom(32))}}),
    "label-huge": _backup_doc(policy__keys={"9" * 5000: {"key": b64(os.urandom(32))}}),
    "key-int": _backup_doc(policy__keys={"1": {"key": 5}}),
    "key-short": _backup_doc(policy__keys={"1": {"key": b64(os.urandom(16))}}),
    "time-int": _backup_doc(policy__keys={"1": {"key": b64(os.urandom(32)), "time": 5}}),
    "time-year": _backup_doc(
        policy__keys={"1": {"key": b64(os.urandom(32)), "creation_time": 2**39}}
    ),
    "name-list": _backup_doc(policy__name=["a"]),
    "policy-list": {"policy": []},
    "rotate-float": _backup_doc(policy__auto_rotate_period=1e300),
    "rotate-huge": _backup_doc(policy__auto_rotate_period=10**30),
    "nested": {"policy": json.loads("[" * 50 + "]" * 50)},
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_vault_backups_are_refused_with_400(world: World, case: str) -> None:
    backup = b64(json.dumps(CRAFTED[case]).encode())
    answer = world.raw("POST", f"/v1/transit/restore/rt-{case}", json={"backup": backup})
    assert answer.status_code in (204, 400), (case, answer.status_code, answer.text)
    # a wrong-typed time or name, a float period: ignored (Vault's reader would fail, but
    # nothing of them reaches the key)
    assert answer.status_code == 400 or case in ("time-int", "time-year", "name-list",
                                                 "rotate-float")  # fmt: skip


def test_deeply_nested_backup_json_is_400(world: World) -> None:
    text = "[" * 100_000 + "]" * 100_000
    answer = world.raw("POST", "/v1/transit/restore/rt-deep", json={"backup": b64(text.encode())})
    assert answer.status_code == 400, answer.text


def test_namespace_header_never_switches_a_token_into_another_realm(world: World) -> None:
    body = {"plaintext": b64(b"x")}
    for who, namespace in (("crypto", "beta"), ("crypto", "beta/"), ("intruder", "master")):
        answer = world.raw(
            "POST", "/v1/transit/encrypt/rt-enc", who, json=body,
            headers={"X-Vault-Namespace": namespace},
        )  # fmt: skip
        assert answer.status_code in (400, 403, 404), (who, namespace, answer.text)
        assert "ciphertext" not in answer.text
    listed = world.raw("GET", "/v1/transit/keys?list=true", "intruder",
                       headers={"X-Vault-Namespace": "master"})  # fmt: skip
    assert "rt-enc" not in listed.text


def test_a_bad_authorization_header_does_not_fall_back_to_a_vault_token(world: World) -> None:
    answer = world.raw(
        "POST", "/v1/transit/encrypt/rt-enc", "admin", json={"plaintext": b64(b"x")},
        headers={"Authorization": "Bearer " + world.tokens["reader"]},
    )  # fmt: skip
    # Authorization wins (documented), so the reader's permissions apply, not the admin's.
    assert answer.status_code == 403, answer.text


def test_reader_cannot_hmac_or_datakey_and_scoped_cannot_reach_other_keys(world: World) -> None:
    for who, path, body in (
        ("reader", "/v1/transit/hmac/rt-enc", {"input": b64(b"x")}),
        ("reader", "/v1/transit/datakey/wrapped/rt-enc", {}),
        ("scoped", "/v1/transit/datakey/wrapped/other", {}),
        ("scoped", "/v1/transit/encrypt/other", {"plaintext": b64(b"x")}),
        ("scoped", "/v1/transit/restore/team-x", {"backup": vault_backup({1: os.urandom(32)})}),
        ("crypto", "/v1/transit/restore/rt-c", {"backup": vault_backup({1: os.urandom(32)})}),
    ):
        answer = world.raw("POST", path, who, json=body)
        assert answer.status_code == 403, (who, path, answer.text)


def test_scoped_rewrap_cannot_move_another_keys_ciphertext(world: World) -> None:
    sealed = world.raw("POST", "/v1/transit/encrypt/other", json={"plaintext": b64(b"secret")})
    ciphertext = sealed.json()["data"]["ciphertext"]
    for path in ("/v1/transit/rewrap/team-a", "/v1/transit/decrypt/team-a"):
        answer = world.raw("POST", path, "scoped", json={"ciphertext": ciphertext})
        assert answer.status_code == 400, answer.text
        assert "secret" not in answer.text and b64(b"secret") not in answer.text


def test_scoped_listing_shows_what_v1_security_shows(world: World) -> None:
    facade = world.raw("GET", "/v1/transit/keys?list=true", "scoped")
    native = world.raw(
        "GET", "/v1/security/keys", headers={"Authorization": "Bearer " + world.tokens["scoped"]}
    )
    assert native.status_code == facade.status_code, (native.text, facade.text)
    assert facade.status_code == 403 or "other" not in facade.text


def test_vault_layout_and_qimem_ciphertexts_do_not_cross(world: World) -> None:
    key = os.urandom(32)
    restored = world.raw("POST", "/v1/transit/restore/rt-legacy",
                         json={"backup": vault_backup({1: key}, name="rt-legacy")})  # fmt: skip
    assert restored.status_code == 204, restored.text
    raw = vault_encrypt(key, 1, b"legacy")
    answer = world.raw("POST", "/v1/transit/decrypt/rt-enc", json={"ciphertext": raw})
    assert answer.status_code == 400, answer.text
    qimem = world.raw("POST", "/v1/transit/encrypt/rt-enc", json={"plaintext": b64(b"q")})
    ct = qimem.json()["data"]["ciphertext"]
    answer = world.raw("POST", "/v1/transit/decrypt/rt-legacy", json={"ciphertext": ct})
    assert answer.status_code == 400, answer.text
    urlsafe = "vault:v1:" + base64.urlsafe_b64encode(b"\xfb\xff" * 20).decode()
    # "vault:v01:" and "vault:v0:" are read as v1 there, as Vault's strconv.Atoi does.
    for bad in (raw.replace("vault:v1:", "vault:v1: "),
                raw.replace("vault:v1:", "vault:v\u0661:"), raw + "=", urlsafe,
                "vault:v99999999999999999999:" + raw.split(":", 2)[2], raw + "\n"):  # fmt: skip
        answer = world.raw("POST", "/v1/transit/decrypt/rt-legacy", json={"ciphertext": bad})
        assert answer.status_code == 400, (
            repr(bad), answer.status_code, answer.text)  # fmt: skip
    # Two encryptions under the restored key never share a nonce.
    made = [
        world.raw("POST", "/v1/transit/encrypt/rt-legacy", json={"plaintext": b64(b"p")})
        .json()["data"]["ciphertext"] for _ in range(5)
    ]  # fmt: skip
    nonces = {base64.b64decode(m.split(":", 2)[2])[:12] for m in made}
    assert len(nonces) == 5


def test_batch_items_of_wrong_shape_are_item_errors_not_500(world: World) -> None:
    items = [{"plaintext": b64(b"ok")}, {"plaintext": 5}, {"plaintext": b64(b"x"),
             "key_version": "\u00b2"}, {"plaintext": b64(b"x"), "context": ["x"]},
             {"plaintext": b64(b"x"), "associated_data": {"a": 1}}]  # fmt: skip
    answer = world.raw("POST", "/v1/transit/encrypt/rt-enc", json={"batch_input": items})
    assert answer.status_code == 400, answer.text
    results = answer.json()["data"]["batch_results"]
    assert "ciphertext" in results[0] and all("error" in r for r in results[1:])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/transit/random/%C2%B2", {}),
        ("/v1/transit/random/platform/%D9%A3", {}),
        ("/v1/transit/random", {"bytes": -1}),
        ("/v1/transit/random", {"bytes": 10**9}),
        ("/v1/transit/random/1234567890", {}),
    ],
)
def test_random_byte_counts_that_are_not_ascii_numbers_are_400(
    world: World, path: str, body: dict[str, Any]
) -> None:
    answer = world.raw("POST", path, "crypto", json=body)
    assert answer.status_code in (400, 403), (path, answer.status_code, answer.text)


def test_hmac_verification_needs_verify_mac_and_odd_versions_are_400(world: World) -> None:
    made = world.raw("POST", "/v1/transit/hmac/rt-enc", json={"input": b64(b"m")})
    tag = made.json()["data"]["hmac"]
    for who in ("reader", "crypto", "scoped"):
        answer = world.raw(
            "POST", "/v1/transit/verify/rt-enc", who, json={"input": b64(b"m"), "hmac": tag}
        )
        assert answer.status_code == 403, (who, answer.text)
    for bad in ("vault:v9999999999:" + tag.split(":", 2)[2], "vault:v0:" + tag.split(":", 2)[2],
                tag.replace("vault:v1:", "vault:v\u0661:"), tag + " "):  # fmt: skip
        answer = world.raw("POST", "/v1/transit/verify/rt-enc",
                           json={"input": b64(b"m"), "hmac": bad})  # fmt: skip
        assert answer.status_code == 400, (bad, answer.status_code, answer.text)


def test_facade_calls_are_audited_by_key_without_message_bytes(world: World) -> None:
    secret = b"redteam-audit-secret-0123456789"
    sealed = world.raw("POST", "/v1/transit/encrypt/rt-enc", "crypto",
                       json={"plaintext": b64(secret)})  # fmt: skip
    ciphertext = sealed.json()["data"]["ciphertext"]
    world.raw("POST", "/v1/transit/decrypt/rt-enc", "crypto", json={"ciphertext": ciphertext})
    world.raw("POST", "/v1/transit/hmac/rt-enc", "crypto", json={"input": b64(secret)})
    denied = world.raw("POST", "/v1/transit/encrypt/other", "scoped",
                       json={"plaintext": b64(secret)})  # fmt: skip
    assert denied.status_code == 403
    records: list[dict[str, Any]] = []
    for _ in range(20):  # message operations are buffered
        answer = requests.get(
            f"{world.url}/v1/auth/realms/master/audit",
            params={"limit": 500},
            headers={"Authorization": "Bearer " + world.tokens["admin"]},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        records = answer.json().get("events") or answer.json().get("items") or []
        text = json.dumps(records)
        if "crypto.decrypt" in text and "crypto.mac" in text:
            break
        time.sleep(0.5)
    text = json.dumps(records)
    assert "crypto.encrypt" in text and "crypto.decrypt" in text and "crypto.mac" in text, text
    for leak in (b64(secret), secret.decode(), ciphertext, ciphertext.split(":", 2)[2]):
        assert leak not in text
    assert world.tokens["crypto"] not in text


def test_restore_never_replaces_an_existing_key(world: World) -> None:
    sealed = world.raw("POST", "/v1/transit/encrypt/rt-enc", json={"plaintext": b64(b"keep")})
    ciphertext = sealed.json()["data"]["ciphertext"]
    backup = vault_backup({1: os.urandom(32)}, name="rt-enc")
    for path, body in (
        ("/v1/transit/restore/rt-enc", {"backup": backup}),
        ("/v1/transit/restore/rt-enc", {"backup": backup, "force": True}),
        ("/v1/transit/restore", {"backup": backup}),
        ("/v1/transit/restore", {"backup": backup, "name": "rt-enc"}),
    ):
        answer = world.raw("POST", path, json=body)
        assert answer.status_code == 400, (path, body.keys(), answer.text)
    opened = world.raw("POST", "/v1/transit/decrypt/rt-enc", json={"ciphertext": ciphertext})
    assert opened.json()["data"]["plaintext"] == b64(b"keep")


def test_scoped_grant_is_not_bypassed_by_naming_a_key_by_its_id(world: World) -> None:
    read = world.raw("GET", "/v1/transit/keys/other")
    assert read.status_code == 200, read.text
    auth = {"Authorization": "Bearer " + world.tokens["admin"]}
    details = requests.get(f"{world.url}/v1/security/keys/other", headers=auth, timeout=30)
    ids = [details.json().get("lineage_id"), details.json().get("key_id")]
    for ref in filter(None, ids):
        for path in (f"/v1/transit/encrypt/{ref}", f"/v1/transit/datakey/wrapped/{ref}"):
            answer = world.raw("POST", path, "scoped", json={"plaintext": b64(b"x")})
            assert answer.status_code in (400, 403, 404), (path, answer.text)
            assert "ciphertext" not in answer.text
    assert any(ids), details.text


# R2 finding 4 (fixed in qimem.services.crypto.refuse_vault_layout): /v1/security never
# seals or opens a qimem envelope with a version restored from Vault.
def test_v1_security_encrypt_never_uses_a_vault_layout_version(world: World) -> None:
    key = os.urandom(32)
    restored = world.raw("POST", "/v1/transit/restore/rt-legacy2",
                         json={"backup": vault_backup({1: key}, name="rt-legacy2")})  # fmt: skip
    assert restored.status_code == 204, restored.text
    auth = {"Authorization": "Bearer " + world.tokens["admin"]}
    native = requests.post(f"{world.url}/v1/security/encrypt", headers=auth, timeout=30,
                           json={"key": "rt-legacy2", "plaintext": b64(b"n")})  # fmt: skip
    # Vault's raw key must not also seal qimem envelopes (two layouts under one AES key,
    # and the facade could not open them): refused, or sealed with a qimem-made version.
    if native.status_code == 200:
        assert native.json()["version"] > 1, native.text
    else:
        assert native.status_code in (400, 409, 422), native.text
