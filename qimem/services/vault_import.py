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
import os
import re
from dataclasses import dataclass, field
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
    KeyVersion,
    LineagePolicy,
    validate_name,
    validate_realm,
)
from qimem.services import crypto, lifecycle, vault_backup
from qimem.services.key_refs import resolve
from qimem.services.lifecycle_common import audit, require_purpose

__all__ = [
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
    lifecycle.check_decryption(app, version, vault_layout=True)  # state, minimum, deletion
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
        checked, limit = lifecycle.check_encryption(app, active, vault_layout=True)
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
    data = vault_backup.decode_backup(backup)
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
    record = vault_backup.lineage_record(app, data, name, realm)
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
