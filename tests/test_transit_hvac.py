"""The Transit-compatible facade driven by the real ``hvac`` client against a live
``qimem serve`` (one per module): attacks first, then every endpoint hvac's
``client.secrets.transit`` uses for keys, encrypt, decrypt, rewrap and data keys.

Every error must reach hvac as ``InvalidRequest``, ``Forbidden`` or ``InvalidPath`` (never
``UnexpectedError``), which hvac raises only for Vault's statuses with a JSON body."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import hvac
import pytest
from hvac.exceptions import Forbidden, InvalidPath, InvalidRequest
from transit_helpers import World, transit_world

pytestmark = pytest.mark.slow


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with transit_world(tmp_path_factory.mktemp("transit")) as world:
        admin = world.client().secrets.transit
        for name in ("shared", "team-a", "other"):
            admin.create_key(name)
        yield world


def transit(world: World, who: str = "admin") -> hvac.api.secrets_engines.Transit:
    return world.client(who).secrets.transit


def seal(world: World, key: str = "shared", data: bytes = b"secret", **kw: object) -> str:
    answer = transit(world).encrypt_data(key, b64(data), **kw)
    return str(answer["data"]["ciphertext"])


def assert_vault_error(answer: object, status: int) -> list[str]:
    assert answer.status_code == status, answer.text  # type: ignore[attr-defined]
    assert answer.headers["Content-Type"] == "application/json"  # type: ignore[attr-defined]
    errors = answer.json()["errors"]  # type: ignore[attr-defined]
    assert isinstance(errors, list) and all(isinstance(e, str) for e in errors)
    return errors  # type: ignore[no-any-return]


# ---- attacks ----------------------------------------------------------------------------


def test_a_token_without_the_permission_is_forbidden(world: World) -> None:
    with pytest.raises(Forbidden):
        transit(world, "reader").encrypt_data("shared", b64(b"x"))
    with pytest.raises(Forbidden):
        transit(world, "reader").decrypt_data("shared", seal(world))
    with pytest.raises(Forbidden):
        transit(world, "reader").create_key("made-by-reader")
    with pytest.raises(Forbidden):
        transit(world, "reader").rotate_key("shared")
    assert transit(world, "reader").read_key("shared")["data"]["latest_version"] >= 1


def test_bad_missing_and_forged_tokens_get_403_permission_denied(world: World) -> None:
    bad = hvac.Client(url=world.url, token="not-a-token", timeout=30)
    assert bad.is_authenticated() is False
    with pytest.raises(Forbidden):
        bad.secrets.transit.encrypt_data("shared", b64(b"x"))
    forged = world.tokens["admin"][:-4] + "AAAA"
    with pytest.raises(Forbidden):
        hvac.Client(url=world.url, token=forged).secrets.transit.read_key("shared")
    import requests

    errors = assert_vault_error(
        requests.get(world.url + "/v1/transit/keys/shared", timeout=30), 403
    )
    assert errors[0] == "permission denied"


def test_another_realms_key_is_not_found(world: World) -> None:
    intruder = transit(world, "intruder")
    with pytest.raises(InvalidPath):
        intruder.read_key("shared")
    with pytest.raises(InvalidRequest):
        intruder.encrypt_data("shared", b64(b"x"))
    with pytest.raises(InvalidRequest):
        intruder.decrypt_data("shared", seal(world))
    with pytest.raises(InvalidPath):  # realm beta has no keys: Vault's empty list is a 404
        intruder.list_keys()


def test_a_scoped_grant_covers_its_keys_only_and_ciphertexts_stay_with_their_key(
    world: World,
) -> None:
    scoped = transit(world, "scoped")
    sealed = scoped.encrypt_data("team-a", b64(b"tenant"))["data"]["ciphertext"]
    assert scoped.decrypt_data("team-a", sealed)["data"]["plaintext"] == b64(b"tenant")
    with pytest.raises(Forbidden):
        scoped.encrypt_data("other", b64(b"x"))
    # another key's ciphertext under the URL of a key the caller may use: refused
    with pytest.raises(InvalidRequest, match="not sealed by the key team-a"):
        scoped.decrypt_data("team-a", seal(world, "other"))
    with pytest.raises(InvalidRequest, match="not sealed by the key team-a"):
        scoped.rewrap_data("team-a", seal(world, "other"))


@pytest.mark.parametrize(
    "ciphertext",
    [
        "vault:v1:!!!notbase64",
        "vault:v1:",
        "vault:v0:QUJD",
        "vault:v99999999999999999999:QUJD",
        "vault:vx:QUJD",
        "v1:QUJD",
        "vault:v1:" + b64(b"QMEV" + b"\x00" * 10),
        "",
    ],
)
def test_malformed_ciphertexts_are_400_with_vault_errors(world: World, ciphertext: str) -> None:
    with pytest.raises(InvalidRequest):
        transit(world).decrypt_data("shared", ciphertext)
    answer = world.raw("POST", "/v1/transit/decrypt/shared", json={"ciphertext": ciphertext})
    assert_vault_error(answer, 400)


def test_the_version_prefix_must_match_the_sealed_version(world: World) -> None:
    good = seal(world)
    version, body = good[len("vault:v") :].split(":", 1)
    with pytest.raises(InvalidRequest, match="version prefix"):
        transit(world).decrypt_data("shared", f"vault:v{int(version) + 1}:{body}")
    flipped = base64.b64decode(body)
    flipped = flipped[:-1] + bytes([flipped[-1] ^ 1])
    with pytest.raises(InvalidRequest):
        transit(world).decrypt_data("shared", f"vault:v{version}:{b64(flipped)}")


def test_oversized_body_and_batch_are_refused_cleanly(world: World) -> None:
    huge = world.raw("POST", "/v1/transit/encrypt/shared", json={"plaintext": "A" * (1536 * 1024)})
    assert_vault_error(huge, 413)
    items = [{"plaintext": b64(b"x")}] * 1001
    with pytest.raises(InvalidRequest, match="more than 1000"):
        transit(world).encrypt_data("shared", plaintext=None, batch_input=items)
    not_json = world.raw("POST", "/v1/transit/encrypt/shared", data=b"{nope")
    assert_vault_error(not_json, 400)
    not_object = world.raw("POST", "/v1/transit/encrypt/shared", json=[1, 2])
    assert_vault_error(not_object, 400)


def test_list_and_unknown_paths_answer_vault_errors(world: World) -> None:
    assert_vault_error(world.raw("LIST", "/v1/transit/nope"), 404)
    assert_vault_error(world.raw("GET", "/v1/transit/keys"), 405)  # a GET without list=true
    assert_vault_error(world.raw("POST", "/v1/transit/export/x/y"), 404)


def test_types_and_options_qimem_lacks_are_refused_by_name(world: World) -> None:
    admin = transit(world)
    with pytest.raises(InvalidRequest, match="unsupported key type"):
        admin.create_key("x-rsa2048", key_type="rsa-2048")
    with pytest.raises(InvalidRequest, match="exportable"):
        admin.create_key("x-export", exportable=True)
    with pytest.raises(InvalidRequest, match="convergent"):
        admin.create_key("x-conv", derived=True, convergent_encryption=True)
    with pytest.raises(InvalidRequest):
        admin.create_key("@bad name")
    with pytest.raises(InvalidRequest, match="nonce"):
        admin.encrypt_data("shared", b64(b"x"), nonce=b64(b"123456789012"))
    with pytest.raises(InvalidRequest, match="latest version"):
        admin.encrypt_data("shared", b64(b"x"), key_version=99)


# ---- tokens and keys --------------------------------------------------------------------


def test_lookup_self_describes_the_token_without_echoing_it(world: World) -> None:
    client = world.client("crypto")
    assert client.is_authenticated()
    data = client.auth.token.lookup_self()["data"]
    assert data["meta"] == {"realm": "master", "username": "crypto"}
    assert "crypto:encrypt" in data["policies"] and 0 < data["ttl"] <= 3600
    assert world.tokens["crypto"] not in str(data)


def test_create_read_list_and_key_types(world: World) -> None:
    admin = transit(world)
    created = admin.create_key("cha", key_type="chacha20-poly1305")
    assert created["data"]["type"] == "chacha20-poly1305"
    admin.create_key("sig", key_type="ed25519")
    data = admin.read_key("sig")["data"]
    assert (data["type"], data["supports_signing"], data["supports_encryption"]) == (
        "ed25519",
        True,
        False,
    )
    data = admin.read_key("shared")["data"]
    assert data["type"] == "aes256-gcm96" and data["exportable"] is False
    assert list(data["keys"]) == ["1"] and isinstance(data["keys"]["1"], int)
    again = admin.create_key("shared")  # Vault: an existing key is left as it is
    assert "already existed" in again["warnings"][0]
    listed = admin.list_keys()["data"]["keys"]
    assert {"shared", "team-a", "cha", "sig"} <= set(listed)
    strict = hvac.Client(url=world.url, token=world.tokens["admin"], strict_http=True)
    assert strict.secrets.transit.list_keys()["data"]["keys"] == listed  # GET ?list=true
    with pytest.raises(InvalidPath):
        admin.read_key("no-such-key")


def test_encrypt_decrypt_with_associated_data_and_chacha(world: World) -> None:
    admin = transit(world)
    for key in ("shared", "cha"):
        sealed = admin.encrypt_data(key, b64(b"payload"), associated_data=b64(b"row-7"))
        ciphertext = sealed["data"]["ciphertext"]
        assert ciphertext.startswith("vault:v1:") and sealed["data"]["key_version"] == 1
        opened = admin.decrypt_data(key, ciphertext, associated_data=b64(b"row-7"))
        assert opened["data"]["plaintext"] == b64(b"payload")
        with pytest.raises(InvalidRequest):
            admin.decrypt_data(key, ciphertext, associated_data=b64(b"row-8"))
        with pytest.raises(InvalidRequest):
            admin.decrypt_data(key, ciphertext)
    empty = admin.encrypt_data("shared", "")["data"]["ciphertext"]
    assert admin.decrypt_data("shared", empty)["data"]["plaintext"] == ""


def test_batches_echo_references_and_fail_per_item(world: World) -> None:
    admin = transit(world)
    items = [{"plaintext": b64(bytes([i])), "reference": f"r{i}"} for i in range(3)]
    results = admin.encrypt_data("shared", plaintext=None, batch_input=items)["data"][
        "batch_results"
    ]
    assert [r["reference"] for r in results] == ["r0", "r1", "r2"]
    back = admin.decrypt_data(
        "shared",
        ciphertext=None,
        batch_input=[{"ciphertext": r["ciphertext"], "reference": r["reference"]} for r in results],
    )["data"]["batch_results"]
    assert [(r["plaintext"], r["reference"]) for r in back] == [
        (b64(bytes([i])), f"r{i}") for i in range(3)
    ]
    mixed = [{"ciphertext": results[0]["ciphertext"]}, {"ciphertext": "vault:v1:bad"}]
    with pytest.raises(InvalidRequest):  # Vault: 400 when an item failed
        admin.decrypt_data("shared", ciphertext=None, batch_input=mixed)
    answer = world.raw(
        "POST",
        "/v1/transit/decrypt/shared",
        json={"batch_input": mixed, "partial_failure_response_code": 207},
    )
    assert answer.status_code == 207
    first, second = answer.json()["data"]["batch_results"]
    assert first["plaintext"] == b64(b"\x00") and "invalid ciphertext" in second["error"]


def test_derived_keys_need_their_context(world: World) -> None:
    admin = transit(world)
    admin.create_key("tenants", derived=True)
    assert admin.read_key("tenants")["data"]["derived"] is True
    ctx = b64(b"tenant-1")
    sealed = admin.encrypt_data("tenants", b64(b"t1"), context=ctx)["data"]["ciphertext"]
    assert admin.decrypt_data("tenants", sealed, context=ctx)["data"]["plaintext"] == b64(b"t1")
    with pytest.raises(InvalidRequest):
        admin.decrypt_data("tenants", sealed, context=b64(b"tenant-2"))
    with pytest.raises(InvalidRequest):
        admin.encrypt_data("tenants", b64(b"t1"))
    batch = admin.encrypt_data(
        "tenants", plaintext=None, batch_input=[{"plaintext": b64(b"a"), "context": ctx}]
    )["data"]["batch_results"]
    assert admin.decrypt_data("tenants", batch[0]["ciphertext"], context=ctx)["data"][
        "plaintext"
    ] == b64(b"a")


def test_rotation_min_versions_rewrap_and_trim(world: World) -> None:
    admin = transit(world)
    admin.create_key("rot")
    old = seal(world, "rot", b"v1 data")
    rotated = admin.rotate_key("rot")
    assert rotated["data"]["latest_version"] == 2
    new = seal(world, "rot", b"v2 data")
    assert new.startswith("vault:v2:")
    assert admin.decrypt_data("rot", old)["data"]["plaintext"] == b64(b"v1 data")
    rewrapped = admin.rewrap_data("rot", old)["data"]
    assert rewrapped["ciphertext"].startswith("vault:v2:") and rewrapped["key_version"] == 2
    admin.update_key_configuration("rot", min_decryption_version=2)
    admin.update_key_configuration("rot", min_encryption_version=2)  # hvac: not both at once
    data = admin.read_key("rot")["data"]
    assert (data["min_decryption_version"], data["min_encryption_version"]) == (2, 2)
    with pytest.raises(InvalidRequest):
        admin.decrypt_data("rot", old)
    assert admin.decrypt_data("rot", rewrapped["ciphertext"])["data"]["plaintext"] == b64(
        b"v1 data"
    )
    with pytest.raises(InvalidRequest, match="min_available_version"):
        admin.trim_key("rot", min_version=3)
    trimmed = admin.trim_key("rot", min_version=2)
    assert list(trimmed["data"]["keys"]) == ["2"]
    with pytest.raises(InvalidRequest):  # above the latest version
        admin.update_key_configuration("rot", min_decryption_version=5)


def test_data_keys_plaintext_and_wrapped(world: World) -> None:
    admin = transit(world)
    plain = admin.generate_data_key("shared", key_type="plaintext")["data"]
    assert len(base64.b64decode(plain["plaintext"])) == 32
    opened = admin.decrypt_data("shared", plain["ciphertext"])["data"]["plaintext"]
    assert opened == plain["plaintext"]
    wrapped = admin.generate_data_key("shared", key_type="wrapped", bits=512)["data"]
    assert "plaintext" not in wrapped
    opened = admin.decrypt_data("shared", wrapped["ciphertext"])["data"]["plaintext"]
    assert len(base64.b64decode(opened)) == 64
    answer = world.raw("POST", "/v1/transit/datakey/plaintext/shared", json={"bits": 384})
    assert_vault_error(answer, 400)  # hvac checks bits itself; the server does too
    assert_vault_error(world.raw("POST", "/v1/transit/datakey/other/shared", json={}), 400)


def test_config_leniency_and_deletion(world: World) -> None:
    admin = transit(world)
    admin.create_key("doomed")
    answer = world.raw(
        "POST",
        "/v1/transit/keys/doomed/config",
        json={"deletion_allowed": "false", "min_decryption_version": "1", "frobnicate": 1},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.json()["data"]["deletion_allowed"] is False
    assert "frobnicate" in answer.json()["warnings"][0]
    with pytest.raises(InvalidRequest, match="deletion is not allowed"):
        admin.delete_key("doomed")
    admin.update_key_configuration("doomed", deletion_allowed=True)
    assert admin.delete_key("doomed").status_code == 204
    assert "deletion_date" in admin.read_key("doomed")["data"]
    with pytest.raises(InvalidRequest):  # pending deletion: refused at once
        admin.encrypt_data("doomed", b64(b"x"))
    with pytest.raises(InvalidRequest):
        admin.update_key_configuration("doomed", auto_rotate_period="10m")
    admin.update_key_configuration("shared", auto_rotate_period="24h")
    assert admin.read_key("shared")["data"]["auto_rotate_period"] == 86400


def test_namespace_header_names_the_realm(world: World) -> None:
    admin = world.client("admin", namespace="beta")
    with pytest.raises(InvalidPath):  # master's admin acting in beta: beta has no "shared"
        admin.secrets.transit.read_key("shared")
