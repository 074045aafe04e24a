"""Import of Vault Transit keys, and their ``vault:vN:`` ciphertexts (issue 17, item 2).

:func:`restore_vault_backup` reads the plaintext backup Vault's ``GET transit/backup/:name``
gives (base64 of the JSON ``{"policy": {..., "keys": {"1": {"key": b64, "hmac_key": b64,
"time": ...}}}, "archived_keys": {"keys": [...]}}``, Vault's ``keysutil.KeyData``) and creates
a lineage whose versions 1..n hold Vault's raw keys, with the lineage policy's
``vault_layout_versions = n`` (stored on the lineage: ciphertexts are never sniffed).

Versions up to that number use **Vault's layout**: ``vault:v<N>:`` + std-base64(nonce (12) ‖
ciphertext ‖ tag), the AEAD's associated data being only the caller's ``associated_data``
(the prefix is not authenticated). Versions made in qimem after the import (a rotation) use
qimem envelopes, ``vault:v<N>:`` + std-base64(envelope), as every other Transit key does. So
the Vault way of migrating works unchanged: rotate, then rewrap every stored ciphertext, and
what comes back is a qimem envelope; then raise ``min_decryption_version`` past the
imported versions.

Refused, with a clear message: derived or convergent Vault keys (Vault's KDF context is not
qimem's), key types qimem lacks (only ``aes256-gcm96`` and ``chacha20-poly1305`` encrypt
here), custom version templates, and a name that is taken (qimem never overwrites a key).
Not imported: Vault's per-version ``hmac_key`` (see :mod:`qimem.services.transit_hmac`),
the usage counts Vault does not keep (an imported version starts at 0: rotate soon).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from qimem import envelope as env
from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import (
    ConflictError,
    DecryptionError,
    NotFoundError,
    PayloadTooLargeError,
    ValidationError,
)
from qimem.keys import (
    DEFAULT_REALM,
    KeyState,
    KeyVersion,
    LineagePolicy,
    LineageRecord,
    VersionRecord,
    new_id,
    validate_name,
    validate_realm,
)
from qimem.services import crypto, lifecycle
from qimem.services.key_refs import resolve
from qimem.services.lifecycle_common import audit, require_purpose

__all__ = [
    "MAX_BACKUP_BYTES",
    "VaultCiphertext",
    "datakey_vault",
    "decrypt_vault",
    "encrypt_vault",
    "format_ciphertext",
    "is_vault_layout",
    "parse_ciphertext",
    "restore_vault_backup",
    "rewrap_vault",
]

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
_CIPHERTEXT_RE = re.compile(r"vault:v([0-9]{1,10}):([A-Za-z0-9+/=]*)")
_NONCE_SIZE = 12


@dataclass(slots=True)
class VaultCiphertext:
    """A ``vault:vN:`` ciphertext and the key version that sealed it."""

    ciphertext: str = field(repr=False)
    key_id: str
    version: int


# -- ciphertext strings ------------------------------------------------------------------


def parse_ciphertext(text: Any) -> tuple[int, bytes]:
    """``(version, bytes)`` of ``vault:v<N>:<base64>`` (``v0`` reads as v1, as in Vault).

    :raises ValidationError: ``invalid_ciphertext``.
    """
    match = _CIPHERTEXT_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValidationError(
            "invalid ciphertext: expected 'vault:v<N>:' and base64", code="invalid_ciphertext"
        )
    try:
        blob = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError(
            "invalid ciphertext: the part after the version is not base64",
            code="invalid_ciphertext",
        ) from None
    return max(1, int(match.group(1))), blob


def format_ciphertext(version: int, blob: bytes) -> str:
    """``vault:v<version>:`` + std-base64(``blob``)."""
    return f"vault:v{version}:{base64.b64encode(blob).decode('ascii')}"


# -- the lineage's layout ----------------------------------------------------------------


def _lineage(app: AppContext, ref: str, realm: str) -> tuple[str, LineagePolicy]:
    validate_realm(realm)
    lineage_id, _ = resolve(app, ref, realm)
    return lineage_id, app.store.policy(realm, lineage_id)


def is_vault_layout(app: AppContext, ref: str, *, realm: str = DEFAULT_REALM) -> bool:
    """Whether the key ``ref`` was imported from Vault (some versions in Vault's layout):
    the Transit facade then encrypts, decrypts, rewraps and makes data keys through this
    module instead of :mod:`qimem.services.crypto`."""
    return _lineage(app, ref, realm)[1].vault_layout


def _version(app: AppContext, realm: str, lineage_id: str, number: int) -> KeyVersion:
    for candidate in app.store.versions(realm, lineage_id):
        if candidate.version == number:
            return candidate
    raise DecryptionError(
        f"invalid ciphertext: key version {number} does not exist", code="no_such_version"
    )


def _raw_open(app: AppContext, version: KeyVersion, blob: bytes, aad: bytes | None) -> bytes:
    require_purpose(app, version, "encrypt", "decryption")
    lifecycle.check_decryption(app, version)  # state, min_decryption_version, deletion
    if len(blob) < _NONCE_SIZE + 16:
        raise DecryptionError("ciphertext failed authentication")
    algorithm = app.registry.algorithm(version.algorithm, "encrypt")
    material = app.store.material(version.realm, version.key_id)
    try:
        return bytes(
            algorithm.decrypt(material, blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], aad or None)
        )
    finally:
        zero(material)


def decrypt_vault(
    app: AppContext,
    ref: str,
    ciphertext: str,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
) -> crypto.DecryptResult:
    """Decrypt a ``vault:vN:`` ciphertext of the Vault-imported key ``ref``: Vault's raw
    layout for an imported version, a qimem envelope of version N of this lineage for a
    later one.

    :raises ValidationError: ``invalid_ciphertext``; ``not_vault_layout`` (``ref`` was not
        imported from Vault: decrypt through :func:`qimem.services.crypto.decrypt`).
    :raises DecryptionError: tampered bytes, wrong ``aad``, no such version, a version
        below ``min_decryption_version``, disabled or destroyed.
    """
    number, blob = parse_ciphertext(ciphertext)
    lineage_id, policy = _lineage(app, ref, realm)
    _require_layout(ref, policy)
    if aad is not None and not isinstance(aad, bytes):
        raise ValidationError("aad must be bytes")
    version = _version(app, realm, lineage_id, number)
    if number <= policy.vault_layout_versions:
        return crypto.DecryptResult(_raw_open(app, version, blob, aad), version.key_id, number)
    try:
        named = env.parse(blob).key_id_str
    except Exception:
        raise DecryptionError("ciphertext failed authentication") from None
    if named != version.key_id:  # an envelope of another key, or of another version
        raise DecryptionError("ciphertext failed authentication")
    return crypto.decrypt(app, blob, aad=aad, realm=realm)


def _require_layout(ref: str, policy: LineagePolicy) -> None:
    if not policy.vault_layout:
        raise ValidationError(
            f"key {ref} was not imported from Vault; its ciphertexts are qimem envelopes",
            code="not_vault_layout",
        )


def encrypt_vault(
    app: AppContext,
    ref: str,
    plaintext: bytes,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
) -> VaultCiphertext:
    """Encrypt with the active version of the Vault-imported key ``ref``: Vault's layout
    while that version is an imported one (each message counted in the store, as every
    qimem encryption is), a qimem envelope once the key was rotated in qimem.

    :raises ValidationError: ``not_vault_layout``.
    """
    if not isinstance(plaintext, bytes):
        raise ValidationError("plaintext must be bytes")
    if aad is not None and not isinstance(aad, bytes):
        raise ValidationError("aad must be bytes")
    if len(plaintext) > app.config.max_envelope_bytes:
        raise PayloadTooLargeError(
            f"plaintext is over the envelope limit of {app.config.max_envelope_bytes} bytes"
        )
    lineage_id, policy = _lineage(app, ref, realm)
    _require_layout(ref, policy)
    while True:
        active = app.store.active_version(realm, lineage_id)
        if active.version > policy.vault_layout_versions:
            sealed = crypto.encrypt(app, active.key_id, plaintext, aad=aad, realm=realm)
            return VaultCiphertext(
                format_ciphertext(sealed.version, sealed.envelope), sealed.key_id, sealed.version
            )
        require_purpose(app, active, "encrypt", "encryption")
        checked, limit = lifecycle.check_encryption(app, active)
        if checked is not active:  # rotated by age just now
            continue
        if app.store.reserve_usage(realm, active.key_id, 1, limit) == 1:
            break
        lifecycle.auto_rotate(app, active, "usage_limit")
    algorithm = app.registry.algorithm(active.algorithm, "encrypt")
    nonce = os.urandom(_NONCE_SIZE)
    material = app.store.material(realm, active.key_id)
    try:
        sealed_raw = algorithm.encrypt(material, nonce, plaintext, aad or None)
    finally:
        zero(material)
    return VaultCiphertext(
        format_ciphertext(active.version, nonce + sealed_raw), active.key_id, active.version
    )


def rewrap_vault(
    app: AppContext,
    ref: str,
    ciphertext: str,
    *,
    aad: bytes | None = None,
    realm: str = DEFAULT_REALM,
) -> VaultCiphertext:
    """Decrypt a ciphertext of the Vault-imported key ``ref`` and encrypt it again with the
    active version (after a rotation in qimem: a qimem envelope)."""
    opened = decrypt_vault(app, ref, ciphertext, aad=aad, realm=realm)
    return encrypt_vault(app, ref, opened.plaintext, aad=aad, realm=realm)


def datakey_vault(
    app: AppContext, ref: str, *, bits: int = 256, realm: str = DEFAULT_REALM
) -> tuple[bytes, VaultCiphertext]:
    """A fresh data key of ``bits`` (128, 256, 512) and the same key encrypted with the
    Vault-imported key ``ref`` (as Vault's ``datakey``: no associated data)."""
    if bits not in (128, 256, 512):
        raise ValidationError("bits must be 128, 256 or 512")
    data_key = os.urandom(bits // 8)
    return data_key, encrypt_vault(app, ref, data_key, realm=realm)


# -- restore -----------------------------------------------------------------------------


def _decode_backup(backup: Any) -> dict[str, Any]:
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
    except ValueError:
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
        return datetime.fromtimestamp(seconds, UTC)
    return datetime.now(UTC)


def _entries(data: dict[str, Any], latest: int) -> dict[int, dict[str, Any]]:
    """Version number -> KeyEntry, from ``policy.keys`` and ``archived_keys.keys``."""
    policy = data["policy"]
    keys = policy.get("keys")
    if not isinstance(keys, dict):
        raise ValidationError("the backup's policy has no keys", code="invalid_backup")
    found: dict[int, dict[str, Any]] = {}
    archive = (data.get("archived_keys") or {}).get("keys") or []
    if not isinstance(archive, list):
        raise ValidationError("the backup's archived_keys are malformed", code="invalid_backup")
    base = _int(policy, "min_available_version")
    for index, entry in enumerate(archive):
        number = index + base
        if 1 <= number <= latest and isinstance(entry, dict) and entry.get("key"):
            found[number] = entry
    for label, entry in keys.items():
        if not (isinstance(label, str) and label.isdigit() and isinstance(entry, dict)):
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


def _record(app: AppContext, data: dict[str, Any], name: str, realm: str) -> LineageRecord:
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


def restore_vault_backup(
    app: AppContext,
    backup: str | bytes,
    *,
    name: str | None = None,
    realm: str = DEFAULT_REALM,
    force: bool = False,
    actor: str | None = None,
) -> KeyVersion:
    """Import a Vault Transit backup (``GET transit/backup/:name`` of a key with
    ``allow_plaintext_backup``) as a new lineage in Vault's layout; return its active
    version.

    :param backup: Vault's base64 answer, or the JSON inside it.
    :param name: the qimem name (default: the name inside the backup; qimem's naming rules
        apply, so a Vault name such as ``1st@key`` needs a new one).
    :param force: accepted for Vault's API; qimem never overwrites a key, so a taken name
        is refused either way.
    :raises ValidationError: ``invalid_backup``, ``unsupported_vault_key``, ``invalid_name``.
    :raises ConflictError: ``name_taken``.
    """
    if not isinstance(force, bool):
        raise ValidationError("force must be true or false")
    validate_realm(realm)
    data = _decode_backup(backup)
    if name is None:
        name = data["policy"].get("name")
        if not isinstance(name, str):
            raise ValidationError("the backup names no key; give a name", code="invalid_name")
    validate_name(name)
    if realm != DEFAULT_REALM and app.has_identity:
        from qimem.services.identity import require_realm

        require_realm(app, realm)
    try:
        app.store.find_lineage(realm, name)
    except NotFoundError:
        pass
    else:
        raise ConflictError(
            f"key {name} already exists in realm {realm!r}; qimem never overwrites a key "
            "(force does not either): restore under another name",
            code="name_taken",
        )
    record = _record(app, data, name, realm)
    try:
        app.store.restore_lineage(record)
    finally:
        for item in record.versions:
            if item.material is not None:
                zero(item.material)
        app.cache.clear()
    audit(
        app,
        realm,
        actor,
        "keys.import_vault",
        record.lineage_id,
        versions=len(record.versions),
        algorithm=record.algorithm,
    )
    active = record.versions[-1]
    from qimem.events import KeyEvent  # imported when an event happens

    created = record.key_version(active)
    app.registry.notify_key_event(KeyEvent("created", realm, created))
    return created
