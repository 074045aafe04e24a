"""Reading Vault Transit backups (``GET transit/backup/:name``): base64 of Vault's
``keysutil.KeyData`` JSON, ``{"policy": {..., "keys": {"1": {"key": b64, "hmac_key": b64,
"time": ...}}}, "archived_keys": {"keys": [...]}}``, made a qimem
:class:`qimem.keys.LineageRecord` in Vault's layout. Used by
:func:`qimem.services.vault_import.restore_vault_backup`, which documents what is refused.

As Vault keeps them, ``policy.keys`` holds the versions from ``min_decryption_version`` up,
and the archive every version from ``min_available_version`` (index = version -
``min_available_version``); versions below ``min_available_version`` were trimmed and
come back destroyed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from datetime import UTC, datetime
from typing import Any

from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import ValidationError
from qimem.keys import KeyState, LineagePolicy, LineageRecord, VersionRecord, new_id

__all__ = ["MAX_BACKUP_BYTES", "MAX_VERSIONS", "decode_backup", "lineage_record"]

#: The largest backup accepted (a key with thousands of versions is far below it).
MAX_BACKUP_BYTES = 16 * 1024 * 1024
#: The most versions a restored key may have (a crafted latest_version must not make a
#: restore write millions of rows).
MAX_VERSIONS = 10_000
#: Vault's ``KeyType`` numbers (``sdk/helper/keysutil/policy.go``) qimem can import.
_TYPES = {0: "aes-256-gcm", 5: "chacha20-poly1305"}
_TYPE_NAMES = {
    1: "ecdsa-p256",
    2: "ed25519",
    3: "rsa-2048",
    4: "rsa-4096",
    6: "ecdsa-p384",
    7: "ecdsa-p521",
    8: "aes128-gcm96",
    9: "rsa-3072",
    10: "managed_key",
    11: "hmac",
}
_TEMPLATE = "vault:v{{version}}:"
#: A version label of ``policy.keys``: ASCII digits (str.isdigit() takes "²", int() does not).
_LABEL = re.compile(r"[0-9]{1,10}")


def decode_backup(backup: Any) -> dict[str, Any]:
    """The ``KeyData`` JSON of a Vault backup: base64 text (Vault's answer) or the JSON."""
    if isinstance(backup, bytes | bytearray):
        backup = bytes(backup).decode("ascii", "replace")
    if not isinstance(backup, str) or not backup.strip():
        raise ValidationError("the backup must be a non-empty string", code="invalid_backup")
    if len(backup) > MAX_BACKUP_BYTES:
        raise ValidationError(f"the backup is over {MAX_BACKUP_BYTES} bytes", code="invalid_backup")
    text = backup.strip()
    if not text.startswith("{"):
        try:
            text = base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise ValidationError(
                "the backup is neither Vault's base64 backup nor its JSON", code="invalid_backup"
            ) from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise ValidationError("the backup is not valid JSON", code="invalid_backup") from None
    if not isinstance(data, dict) or not isinstance(data.get("policy"), dict):
        raise ValidationError(
            "the backup has no 'policy': is it a Vault Transit backup?", code="invalid_backup"
        )
    return data


def _int(policy: dict[str, Any], name: str, default: int = 0) -> int:
    value = policy.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**31:
        raise ValidationError(f"the backup's {name} is not a valid number", code="invalid_backup")
    return value


def _check_policy(policy: dict[str, Any]) -> str:
    """The qimem algorithm of a Vault policy qimem can import; refuse the others."""
    kind = policy.get("type", 0)
    if not isinstance(kind, int) or isinstance(kind, bool) or kind not in _TYPES:
        label = _TYPE_NAMES.get(kind, str(kind)) if isinstance(kind, int) else str(kind)
        raise ValidationError(
            f"Vault key type {label} cannot be imported: qimem imports aes256-gcm96 and "
            "chacha20-poly1305 keys",
            code="unsupported_vault_key",
        )
    if policy.get("derived") or policy.get("convergent_encryption"):
        raise ValidationError(
            "derived (or convergent) Vault keys cannot be imported: Vault derives each "
            "context's key with its own KDF, which qimem's derived keys do not reproduce; "
            "rewrap their ciphertexts under a non-derived key in Vault first",
            code="unsupported_vault_key",
        )
    template = policy.get("version_template") or _TEMPLATE
    if template != _TEMPLATE:
        raise ValidationError(
            f"Vault keys with a custom version_template cannot be imported (only {_TEMPLATE})",
            code="unsupported_vault_key",
        )
    return _TYPES[kind]


def _entry_time(entry: dict[str, Any]) -> datetime:
    text = entry.get("time")
    if isinstance(text, str):
        # Go writes RFC 3339 with up to 9 fractional digits; Python reads up to 6.
        text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
        try:
            when = datetime.fromisoformat(text)
            return when if when.tzinfo else when.replace(tzinfo=UTC)
        except ValueError:
            pass
    seconds = entry.get("creation_time")
    if isinstance(seconds, int) and not isinstance(seconds, bool) and 0 < seconds < 2**40:
        with contextlib.suppress(ValueError, OverflowError, OSError):  # past year 9999
            return datetime.fromtimestamp(seconds, UTC)
    return datetime.now(UTC)


def _entries(data: dict[str, Any], latest: int) -> dict[int, dict[str, Any]]:
    """Version number -> KeyEntry, from ``policy.keys`` and ``archived_keys.keys``."""
    policy = data["policy"]
    keys = policy.get("keys")
    if not isinstance(keys, dict):
        raise ValidationError("the backup's policy has no keys", code="invalid_backup")
    found: dict[int, dict[str, Any]] = {}
    archived = data.get("archived_keys") or {}
    archive = (archived.get("keys") or []) if isinstance(archived, dict) else None
    if not isinstance(archive, list):
        raise ValidationError("the backup's archived_keys are malformed", code="invalid_backup")
    base = _int(policy, "min_available_version")
    for index, entry in enumerate(archive):
        number = index + base
        if 1 <= number <= latest and isinstance(entry, dict) and entry.get("key"):
            found[number] = entry
    for label, entry in keys.items():
        if not (isinstance(label, str) and _LABEL.fullmatch(label) and isinstance(entry, dict)):
            raise ValidationError("the backup's keys are malformed", code="invalid_backup")
        number = int(label)
        if not 1 <= number <= latest:
            raise ValidationError(
                f"the backup's key version {number} is above latest_version {latest}",
                code="invalid_backup",
            )
        found[number] = entry
    return found


def _material(entry: dict[str, Any], number: int, size: int) -> bytearray:
    try:
        raw = bytearray(base64.b64decode(entry.get("key") or "", validate=True))
    except (binascii.Error, ValueError, TypeError):
        raw = bytearray()
    if len(raw) != size:
        zero(raw)
        raise ValidationError(
            f"the backup's key version {number} is not a {size}-byte key", code="invalid_backup"
        )
    return raw


def lineage_record(app: AppContext, data: dict[str, Any], name: str, realm: str) -> LineageRecord:
    policy = data["policy"]
    algorithm_name = _check_policy(policy)
    algorithm = app.registry.algorithm(algorithm_name, "encrypt")
    latest = _int(policy, "latest_version")
    if not 1 <= latest <= MAX_VERSIONS:
        raise ValidationError(
            f"the backup's latest_version must be from 1 to {MAX_VERSIONS}", code="invalid_backup"
        )
    entries = _entries(data, latest)
    trimmed = max(1, _int(policy, "min_available_version"))  # below it: trimmed in Vault
    missing = [n for n in range(trimmed, latest + 1) if n not in entries]
    if missing:
        raise ValidationError(
            f"the backup lacks key version {missing[0]} (it is not trimmed)",
            code="invalid_backup",
        )
    versions: list[VersionRecord] = []
    try:
        for number in range(1, latest + 1):
            entry = entries.get(number) if number >= trimmed else None
            material = None if entry is None else _material(entry, number, algorithm.key_size)
            if material is None:
                state = KeyState.DESTROYED  # trimmed in Vault (below min_available_version)
            else:
                state = KeyState.ACTIVE if number == latest else KeyState.DECRYPT_ONLY
            created = _entry_time(entry or {})
            versions.append(VersionRecord(new_id(), number, state, created, 0, material))
    except BaseException:
        for item in versions:
            if item.material is not None:
                zero(item.material)
        raise
    rotate_ns = policy.get("auto_rotate_period") or 0  # a Go time.Duration: nanoseconds
    valid_period = isinstance(rotate_ns, int) and not isinstance(rotate_ns, bool)
    period = rotate_ns // 1_000_000_000 if valid_period and rotate_ns > 0 else 0
    if period >= 2**31:
        raise ValidationError(
            "the backup's auto_rotate_period is out of range", code="invalid_backup"
        )
    lineage_policy = LineagePolicy(
        min_decryption_version=min(max(1, _int(policy, "min_decryption_version", 1)), latest),
        min_encryption_version=min(max(1, _int(policy, "min_encryption_version", 1)), latest),
        auto_rotate_seconds=period or None,
        deletion_protection=not bool(policy.get("deletion_allowed", False)),
        vault_layout_versions=latest,
    )
    return LineageRecord(
        lineage_id=new_id(),
        realm=realm,
        name=name,
        algorithm=algorithm.name,
        created_at=versions[0].created_at,
        policy=lineage_policy,
        versions=versions,
    )
