"""An independent implementation of Vault Transit's key backup and ciphertext layout,
written from Vault's documented format (``sdk/helper/keysutil/policy.go``) with
cryptography's AEAD classes directly: the other side of qimem's Vault import tests
(tests/test_vault_import.py, tests/test_transit_hvac_more.py).

A backup is base64 of the ``KeyData`` JSON; a ciphertext is ``vault:v<N>:`` +
std-base64(nonce 12 ‖ ciphertext ‖ tag), with only the caller's associated data as AAD.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _entry(key: bytes) -> dict[str, Any]:
    return {
        "key": b64(key),
        "hmac_key": b64(os.urandom(32)),
        "time": "2024-05-01T10:00:00.123456789Z",
        "ec_x": None,
        "ec_y": None,
        "ec_d": None,
        "rsa_key": None,
        "public_key": "",
        "convergent_version": 0,
        "creation_time": 1714557600,
    }


def vault_backup(
    versions: dict[int, bytes],
    *,
    name: str = "legacy",
    kind: int = 0,
    min_decryption_version: int = 1,
    min_available_version: int = 0,
    as_json: bool = False,
    **policy: Any,
) -> str:
    """What ``GET transit/backup/:name`` answers: base64 of the KeyData JSON. As Vault does,
    ``policy.keys`` holds the versions from ``min_decryption_version`` up, and the archive
    every version from ``min_available_version`` (index = version - min_available_version)."""
    latest = max(versions)
    blank = {"key": None, "hmac_key": None, "time": "0001-01-01T00:00:00Z", "creation_time": 0}
    archive = [
        _entry(versions[v]) if v in versions else blank
        for v in range(min_available_version, latest + 1)
    ]
    document = {
        "policy": {
            "name": name,
            "keys": {str(v): _entry(k) for v, k in versions.items() if v >= min_decryption_version},
            "derived": False,
            "kdf": 0,
            "convergent_encryption": False,
            "exportable": False,
            "min_decryption_version": min_decryption_version,
            "min_encryption_version": 0,
            "latest_version": latest,
            "archive_version": latest,
            "archive_min_version": min_available_version,
            "min_available_version": min_available_version,
            "deletion_allowed": False,
            "convergent_version": 0,
            "type": kind,
            "backup_info": {"time": "2026-12-01T09:00:00Z", "version": latest},
            "restore_info": None,
            "allow_plaintext_backup": True,
            "version_template": "",
            "storage_prefix": "",
            "auto_rotate_period": 0,
            "Imported": False,
            "AllowImportedKeyRotation": False,
            **policy,
        },
        "archived_keys": {"keys": archive},
    }
    text = json.dumps(document)
    return text if as_json else b64(text.encode())


def vault_encrypt(
    key: bytes, version: int, plaintext: bytes, aad: bytes | None = None, aead: Any = AESGCM
) -> str:
    nonce = os.urandom(12)
    return f"vault:v{version}:" + b64(nonce + aead(key).encrypt(nonce, plaintext, aad))


def vault_decrypt(key: bytes, ciphertext: str, aad: bytes | None = None) -> bytes:
    blob = base64.b64decode(ciphertext.split(":", 2)[2])
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)
