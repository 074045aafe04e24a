"""Import of Vault Transit keys (issue 17, item 2): a Vault backup restores as a lineage in
Vault's layout, whose ``vault:vN:`` ciphertexts decrypt, and rewrap into qimem envelopes.

The Vault side is an independent implementation written here from Vault's documented
format (``sdk/helper/keysutil/policy.go``): the backup is base64 of the ``KeyData`` JSON,
and a ciphertext is ``vault:v<N>:`` + std-base64(nonce 12 ‖ ciphertext ‖ tag) with only the
caller's associated data as AAD. It uses cryptography's AEAD classes directly.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import make_app
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from vault_helpers import b64, vault_backup, vault_decrypt, vault_encrypt

from qimem import envelope as env
from qimem.app import AppContext
from qimem.backup import export_keys, import_keys
from qimem.errors import ConflictError, DecryptionError, PayloadTooLargeError, ValidationError
from qimem.keys import KeyState
from qimem.services import crypto, keys, lifecycle
from qimem.services.vault_import import (
    decrypt_vault,
    encrypt_vault,
    is_vault_layout,
    restore_vault_backup,
    rewrap_vault,
)


def _tamper(ciphertext: str, index: int = -1) -> str:
    head, body = ciphertext.rsplit(":", 1)
    blob = bytearray(base64.b64decode(body))
    blob[index] ^= 1
    return f"{head}:{b64(bytes(blob))}"


@pytest.fixture
def vault_keys() -> dict[int, bytes]:
    return {1: os.urandom(32), 2: os.urandom(32)}


# -- restore and decrypt -----------------------------------------------------------------


def test_restored_key_decrypts_vault_ciphertexts(
    any_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    old = vault_encrypt(vault_keys[1], 1, b"from v1", b"row-7")
    new = vault_encrypt(vault_keys[2], 2, b"from v2")
    active = restore_vault_backup(any_app, vault_backup(vault_keys), actor="tester")
    assert (active.name, active.version, active.algorithm) == ("legacy", 2, "aes-256-gcm")
    assert is_vault_layout(any_app, "legacy")
    policy = lifecycle.get_policy(any_app, "legacy")
    assert policy.vault_layout_versions == 2 and policy.deletion_protection
    assert decrypt_vault(any_app, "legacy", old, aad=b"row-7").plaintext == b"from v1"
    assert decrypt_vault(any_app, "legacy", new).plaintext == b"from v2"
    v0 = "vault:v0:" + new.split(":", 2)[2]  # Vault reads v0 as v1
    with pytest.raises(DecryptionError):
        decrypt_vault(any_app, "legacy", v0)  # ... and v2's ciphertext fails under v1
    assert decrypt_vault(any_app, "legacy", "vault:v0:" + old.split(":", 2)[2], aad=b"row-7")


def test_the_json_inside_the_backup_restores_too(memory_app: AppContext) -> None:
    key = os.urandom(32)
    restore_vault_backup(memory_app, vault_backup({1: key}, as_json=True), name="plain")
    ct = vault_encrypt(key, 1, b"x")
    assert decrypt_vault(memory_app, "plain", ct).plaintext == b"x"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda ct: _tamper(ct), id="tag"),
        pytest.param(lambda ct: _tamper(ct, 0), id="nonce"),
        pytest.param(lambda ct: _tamper(ct, 13), id="body"),
        pytest.param(lambda ct: ct.replace("vault:v1:", "vault:v2:"), id="other-version"),
        pytest.param(lambda ct: ct[:20], id="truncated"),
    ],
)
def test_tampered_or_relabelled_ciphertexts_fail(
    memory_app: AppContext, vault_keys: dict[int, bytes], mutate: Any
) -> None:
    restore_vault_backup(memory_app, vault_backup(vault_keys))
    ct = vault_encrypt(vault_keys[1], 1, b"secret payload", b"aad")
    with pytest.raises((DecryptionError, ValidationError)):
        decrypt_vault(memory_app, "legacy", mutate(ct), aad=b"aad")


def test_wrong_or_missing_aad_and_unknown_versions_fail(
    memory_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    restore_vault_backup(memory_app, vault_backup(vault_keys))
    ct = vault_encrypt(vault_keys[2], 2, b"p", b"right")
    for aad in (b"wrong", None):
        with pytest.raises(DecryptionError):
            decrypt_vault(memory_app, "legacy", ct, aad=aad)
    with pytest.raises(DecryptionError) as err:
        decrypt_vault(memory_app, "legacy", ct.replace("vault:v2:", "vault:v9:"), aad=b"right")
    assert err.value.code == "no_such_version"


@pytest.mark.parametrize(
    "text",
    ["", "vault:v1:", "vault:1:AAAA", "vault:v1:not base64!", "vault:v-1:AAAA", "V:v1:AA", 7],
)
def test_malformed_ciphertexts_are_one_clear_error(memory_app: AppContext, text: Any) -> None:
    restore_vault_backup(memory_app, vault_backup({1: os.urandom(32)}))
    with pytest.raises((ValidationError, DecryptionError)) as err:
        decrypt_vault(memory_app, "legacy", text)
    assert "base64" in str(err.value) or "ciphertext" in str(err.value)


def test_min_decryption_version_and_trimmed_versions(memory_app: AppContext) -> None:
    versions = {v: os.urandom(32) for v in (1, 2, 3, 4)}
    backup = vault_backup(versions, min_decryption_version=3, min_available_version=2)
    del versions[1]  # trimmed in Vault: not in the archive
    restore_vault_backup(memory_app, backup)
    states = [v.state for v in keys.show_key(memory_app, "legacy").versions]
    assert states == [
        KeyState.DESTROYED,
        KeyState.DECRYPT_ONLY,
        KeyState.DECRYPT_ONLY,
        KeyState.ACTIVE,
    ]
    with pytest.raises(DecryptionError) as err:
        decrypt_vault(memory_app, "legacy", vault_encrypt(versions[2], 2, b"old"))
    assert err.value.code == "below_min_decryption_version"
    # v2 came from the archive: lowering the minimum makes it decrypt again.
    lifecycle.set_policy(memory_app, "legacy", min_decryption_version=2)
    assert decrypt_vault(memory_app, "legacy", vault_encrypt(versions[2], 2, b"old")).plaintext
    with pytest.raises(DecryptionError) as err:
        decrypt_vault(memory_app, "legacy", vault_encrypt(os.urandom(32), 1, b"gone"))
    assert err.value.code == "key_destroyed"


def test_chacha20_keys_import(memory_app: AppContext) -> None:
    key = os.urandom(32)
    restore_vault_backup(memory_app, vault_backup({1: key}, kind=5), name="cc")
    ct = vault_encrypt(key, 1, b"chacha", b"a", aead=ChaCha20Poly1305)
    assert decrypt_vault(memory_app, "cc", ct, aad=b"a").plaintext == b"chacha"
    assert keys.show_key(memory_app, "cc").algorithm == "chacha20-poly1305"


# -- encrypt, rotate, rewrap -------------------------------------------------------------


def test_encrypting_with_an_imported_version_writes_vault_layout(
    memory_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    restore_vault_backup(memory_app, vault_backup(vault_keys))
    sealed = encrypt_vault(memory_app, "legacy", b"new row", aad=b"r1")
    assert sealed.ciphertext.startswith("vault:v2:") and sealed.version == 2
    assert vault_decrypt(vault_keys[2], sealed.ciphertext, b"r1") == b"new row"  # Vault reads it
    assert decrypt_vault(memory_app, "legacy", sealed.ciphertext, aad=b"r1").plaintext == b"new row"
    assert lifecycle.key_usage(memory_app, "legacy")[sealed.key_id] == 1  # counted


def test_rotate_then_rewrap_moves_ciphertexts_into_qimem_envelopes(
    any_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    restore_vault_backup(any_app, vault_backup(vault_keys))
    old = vault_encrypt(vault_keys[1], 1, b"migrate me", b"id-1")
    keys.rotate_key(any_app, "legacy")
    rewrapped = rewrap_vault(any_app, "legacy", old, aad=b"id-1")
    assert rewrapped.version == 3 and rewrapped.ciphertext.startswith("vault:v3:")
    envelope = base64.b64decode(rewrapped.ciphertext.split(":", 2)[2])
    assert envelope[:4] == env.MAGIC  # a qimem envelope, authenticated header and all
    assert crypto.decrypt(any_app, envelope, aad=b"id-1").plaintext == b"migrate me"
    assert decrypt_vault(any_app, "legacy", rewrapped.ciphertext, aad=b"id-1").plaintext == (
        b"migrate me"
    )
    fresh = encrypt_vault(any_app, "legacy", b"after rotation")
    assert fresh.version == 3
    assert base64.b64decode(fresh.ciphertext.split(":", 2)[2])[:4] == env.MAGIC
    # Once everything is rewrapped, the imported versions can be retired.
    lifecycle.set_policy(any_app, "legacy", min_decryption_version=3)
    with pytest.raises(DecryptionError):
        decrypt_vault(any_app, "legacy", old, aad=b"id-1")
    assert decrypt_vault(any_app, "legacy", rewrapped.ciphertext, aad=b"id-1").plaintext


def test_usage_limit_rotates_away_from_the_vault_layout(
    memory_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    restore_vault_backup(memory_app, vault_backup(vault_keys))
    lifecycle.set_policy(memory_app, "legacy", usage_limit=2)
    made = [encrypt_vault(memory_app, "legacy", b"m").version for _ in range(3)]
    assert made == [2, 2, 3]  # the third message found v2 at its limit: rotated


def test_ciphertexts_are_never_sniffed(
    memory_app: AppContext, vault_keys: dict[int, bytes]
) -> None:
    restore_vault_backup(memory_app, vault_backup(vault_keys))
    # The imported version 2 never seals a qimem envelope (so none can be relabelled v2).
    v2 = keys.show_key(memory_app, "legacy").versions[1]
    with pytest.raises(ValidationError) as refused:
        crypto.encrypt(memory_app, v2.key_id, b"native")
    assert refused.value.code == "vault_layout_key"
    # Another key's envelope labelled as this key's qimem-made version 3: refused.
    keys.rotate_key(memory_app, "legacy")
    keys.create_key(memory_app, name="other")
    foreign = crypto.encrypt(memory_app, "other", b"foreign").envelope
    with pytest.raises(DecryptionError):
        decrypt_vault(memory_app, "legacy", "vault:v3:" + b64(foreign))
    # A key that was not imported never reads the raw layout.
    with pytest.raises(ValidationError) as err:
        decrypt_vault(memory_app, "other", vault_encrypt(vault_keys[1], 1, b"x"))
    assert err.value.code == "not_vault_layout"
    assert not is_vault_layout(memory_app, "other")


def test_oversized_plaintext_is_refused(memory_app: AppContext) -> None:
    restore_vault_backup(memory_app, vault_backup({1: os.urandom(32)}))
    with pytest.raises(PayloadTooLargeError):
        encrypt_vault(memory_app, "legacy", b"x" * (memory_app.config.max_envelope_bytes + 1))


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ({"derived": True, "kdf": 1}, "derived"),
        ({"convergent_encryption": True, "derived": True}, "derived"),
        ({"type": 2}, "ed25519"),
        ({"type": 8}, "aes128-gcm96"),
        ({"type": 11}, "hmac"),
        ({"type": "aes"}, "cannot be imported"),
        ({"version_template": "enc:{{version}}:"}, "version_template"),
        ({"latest_version": 0}, "latest_version"),
    ],
)
def test_unsupported_vault_keys_are_refused(
    memory_app: AppContext, policy: dict[str, Any], words: str
) -> None:
    overrides = dict(policy)
    kind = overrides.pop("type", 0)
    with pytest.raises(ValidationError) as err:
        restore_vault_backup(memory_app, vault_backup({1: os.urandom(32)}, kind=kind, **overrides))
    assert words in str(err.value)
    assert keys.list_keys(memory_app) == []


@pytest.mark.parametrize(
    "backup",
    [
        "",
        "not base64 at all!",
        b64(b"not json"),
        b64(b"[]"),
        b64(json.dumps({"archived_keys": {}}).encode()),
        b64(json.dumps({"policy": {"latest_version": 1, "keys": []}}).encode()),
        b64(json.dumps({"policy": {"latest_version": 2, "keys": {"1": {}}}}).encode()),
        b64(json.dumps({"policy": {"latest_version": 1, "keys": {"1": {"key": "AAAA"}}}}).encode()),
        b64(json.dumps({"policy": {"latest_version": 1, "keys": {"x": {"key": "AA"}}}}).encode()),
        "A" * (16 * 1024 * 1024 + 4),
        b64(  # a crafted latest_version must not make the restore write 2^31 rows
            json.dumps(
                {
                    "policy": {
                        "latest_version": 2**31 - 1,
                        "min_available_version": 2**31 - 1,
                        "keys": {str(2**31 - 1): {"key": b64(bytes(32))}},
                    }
                }
            ).encode()
        ),
        pytest.param(vault_backup({1: os.urandom(32), 3: os.urandom(32)}), id="v2-missing"),
    ],
)
def test_malformed_backups_are_one_clear_error(memory_app: AppContext, backup: str) -> None:
    with pytest.raises(ValidationError) as err:
        restore_vault_backup(memory_app, backup, name="k")
    assert err.value.code == "invalid_backup"
    assert "Traceback" not in str(err.value)
    assert keys.list_keys(memory_app) == []


def test_a_taken_name_is_never_overwritten(memory_app: AppContext) -> None:
    keys.create_key(memory_app, name="legacy")
    for force in (False, True):
        with pytest.raises(ConflictError) as err:
            restore_vault_backup(memory_app, vault_backup({1: os.urandom(32)}), force=force)
        assert err.value.code == "name_taken"
    assert len(keys.show_key(memory_app, "legacy").versions) == 1


def test_vault_names_outside_qimem_rules_need_a_new_name(memory_app: AppContext) -> None:
    backup = vault_backup({1: os.urandom(32)}, name="1st@key")
    with pytest.raises(ValidationError) as err:
        restore_vault_backup(memory_app, backup)
    assert err.value.code == "invalid_name"
    assert restore_vault_backup(memory_app, backup, name="first-key").name == "first-key"


def test_errors_and_reprs_hold_no_key_material(memory_app: AppContext) -> None:
    key = os.urandom(32)
    backup = vault_backup({1: key})
    restore_vault_backup(memory_app, backup)
    sealed = encrypt_vault(memory_app, "legacy", b"secret-plaintext")
    assert "secret" not in repr(sealed) and sealed.ciphertext not in repr(sealed)
    with pytest.raises(ConflictError) as err:
        restore_vault_backup(memory_app, backup)
    assert b64(key) not in str(err.value)


# -- storage: the flag survives the stores, reopening and qimem's own backups -------------


def test_the_flag_survives_reopening_and_qimem_backups(tmp_path: Path, root_key_b64: str) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    key = os.urandom(32)
    app = make_app(url, root_key_b64)
    try:
        restore_vault_backup(app, vault_backup({1: key}))
        backup = export_keys(app, ["legacy"], "a long enough passphrase for the test")
    finally:
        app.close()
    ct = vault_encrypt(key, 1, b"kept")
    reopened = make_app(url, root_key_b64)
    try:
        assert lifecycle.get_policy(reopened, "legacy").vault_layout_versions == 1
        assert decrypt_vault(reopened, "legacy", ct).plaintext == b"kept"
    finally:
        reopened.close()
    other = make_app("memory://", None)
    try:
        import_keys(other, backup, "a long enough passphrase for the test")
        assert decrypt_vault(other, "legacy", ct).plaintext == b"kept"
    finally:
        other.close()


def test_a_store_from_before_the_flag_reads_no_vault_layout(
    tmp_path: Path, root_key_b64: str
) -> None:
    from migration_helpers import downgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    app = make_app(url, root_key_b64)
    keys.create_key(app, name="plain")
    app.close()
    downgrade(url, "0008")
    reopened = make_app(url, root_key_b64)  # upgrades to head
    try:
        assert lifecycle.get_policy(reopened, "plain").vault_layout_versions == 0
        restore_vault_backup(reopened, vault_backup({1: os.urandom(32)}))
        assert is_vault_layout(reopened, "legacy")
    finally:
        reopened.close()
