"""Vault Transit's ``hmac`` and HMAC ``verify`` (issue 17): on MAC keys, and on encryption
keys as Vault allows ("each key version carries its own HMAC key").

**Encryption keys** (purpose ``encrypt`` or ``deterministic``) store no HMAC key, so each
version's is derived from its material: HKDF-SHA256 (RFC 5869), no salt, info
``"qimem-transit-hmac-v1" 0x00``, 32 bytes (Vault's HMAC keys are 256-bit). The label is
fixed and distinct from the derived-key contexts of :mod:`qimem.services.derived`
(``"qimem-derived-v1" 0x00 context``), so no context can make a derived subkey equal an HMAC
key; the HMAC key never encrypts, and the encryption key never MACs. No storage change: a
version's HMAC key lives and dies with its material (destroyed, it can no longer MAC).

**MAC keys** (``hmac-sha256``, ``hmac-sha512``: qimem's ``hmac`` type) use their own
material through :mod:`qimem.services.macs`; their hash is the key's own.

Output: ``vault:v<N>:`` + std-base64(tag), N the key version (Vault's format). Verification
compares in constant time (:func:`hmac.compare_digest`).

Versions: ``key_version`` (default: the active one) must be from ``min_encryption_version``
to the active version to compute; a tag verifies under version N if N is at least
``min_decryption_version`` and not disabled or destroyed (Vault's rules).

Not Vault's bytes for imported Vault keys: Vault's per-version random ``hmac_key`` is not
imported (:mod:`qimem.services.vault_import`), so tags Vault made do not verify here.
"""

from __future__ import annotations

import base64
import binascii
import hmac as _hmac
import re
from dataclasses import dataclass, field
from typing import Any

from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import ConflictError, KeyNotActiveError, QimemError, ValidationError
from qimem.keys import DEFAULT_REALM, KeyState, KeyVersion
from qimem.services import crypto, handles, lifecycle, macs
from qimem.services.key_refs import resolve
from qimem.services.lifecycle_common import audit, key_purpose, version_of

__all__ = [
    "HMAC_INFO",
    "HmacResult",
    "hmac",
    "transit_hmac_key",
    "verify_hmac",
]

#: The HKDF info label of an encryption key version's HMAC key.
HMAC_INFO = b"qimem-transit-hmac-v1\x00"
HMAC_KEY_SIZE = 32
#: Vault's hash names for ``algorithm`` (``sha2-256`` is the default).
_HASHES = {
    "sha2-224": "sha224",
    "sha2-256": "sha256",
    "sha2-384": "sha384",
    "sha2-512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
}
_MAC_KEY_HASH = {"hmac-sha256": "sha2-256", "hmac-sha512": "sha2-512"}
DEFAULT_ALGORITHM = "sha2-256"
_TAG_RE = re.compile(r"vault:v([0-9]{1,10}):([A-Za-z0-9+/]*={0,2})")
_ENCRYPTION = ("encrypt", "deterministic")


@dataclass(slots=True)
class HmacResult:
    """A Transit HMAC (``vault:vN:`` + base64) and the key version that made it."""

    hmac: str = field(repr=False)
    key_id: str
    version: int


def transit_hmac_key(material: bytes | bytearray) -> bytearray:
    """The HMAC key of an encryption key version: HKDF-SHA256(material, info
    :data:`HMAC_INFO`), 32 bytes. The caller zeroes it."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(algorithm=hashes.SHA256(), length=HMAC_KEY_SIZE, salt=None, info=HMAC_INFO)
    return bytearray(hkdf.derive(bytes(material)))


def _algorithm(purpose: str, key: KeyVersion, algorithm: Any) -> str:
    """The Vault hash name to use: the key's own for a MAC key (``algorithm`` must agree
    when given), ``algorithm`` (default sha2-256) for an encryption key."""
    if algorithm is not None and algorithm not in _HASHES:
        raise ValidationError(
            f"unsupported hash algorithm {algorithm!r}; use one of {', '.join(_HASHES)}",
            code="invalid_algorithm",
        )
    if purpose == "mac":
        own = _MAC_KEY_HASH.get(key.algorithm)
        if own is None or (algorithm is not None and algorithm != own):
            raise ValidationError(
                f"key {key.name or key.lineage_id} is an {key.algorithm} key; its hash is "
                f"{own or 'its own'}, not {algorithm}",
                code="invalid_algorithm",
            )
        return own
    if purpose not in _ENCRYPTION:
        label = key.name or key.lineage_id
        raise ValidationError(
            f"key {label} is a {purpose} key ({key.algorithm}); an HMAC needs an "
            "encryption or MAC key",
            code="wrong_purpose",
        )
    return algorithm or DEFAULT_ALGORITHM


def _data(data: Any) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError("the input must be bytes")
    return bytes(data)


def _version(app: AppContext, ref: str, key_version: Any, realm: str) -> tuple[KeyVersion, str]:
    """The version to compute with, and its purpose (Vault's ``key_version``: 0 or None
    is the active version)."""
    lineage_id, exact = resolve(app, ref, realm)
    if key_version in (None, 0):
        version = exact or app.store.active_version(realm, lineage_id)
    else:
        version = version_of(app, lineage_id if exact else ref, key_version, realm)
    purpose = key_purpose(app, version)
    policy = app.store.policy(realm, lineage_id)
    active = app.store.active_version(realm, lineage_id)
    if version.version < policy.min_encryption_version:
        raise KeyNotActiveError(
            f"key version {version.version} is below the minimum encryption version "
            f"{policy.min_encryption_version}"
        )
    if version.version > active.version or version.state not in (
        KeyState.ACTIVE,
        KeyState.DECRYPT_ONLY,
    ):
        raise ConflictError(
            f"key version {version.version} is {version.state.value}", code="key_disabled"
        )
    lifecycle.check_verification(app, version)  # pending deletion, min_decryption_version
    return version, purpose


#: HMAC keys of active encryption-key versions, by the id of the key cache entry that
#: vouches for the version (:meth:`qimem.keycache.KeyCache.for_encrypt`, the entry
#: :func:`qimem.services.crypto.encrypt` uses), identity-checked: the cache drops that entry
#: on a rotation, a state or policy change or a scheduled deletion (and other servers'
#: ones at its next marker check), after which its HMAC key is never used again. Bounded.
_ACTIVE_KEYS: dict[int, tuple[Any, bytes]] = {}
_MAX_ACTIVE_KEYS = 1024


def _cached(app: AppContext, ref: str, realm: str) -> tuple[Any, bytes] | None:
    """``(cache entry, HMAC key)`` of the active version of the encryption key ``ref``,
    when both are cached."""
    entry = app.cache.for_encrypt(realm, ref)
    found = _ACTIVE_KEYS.get(id(entry)) if entry is not None else None
    if found is None or found[0] is not entry:
        return None
    return found


def _remember(app: AppContext, ref: str, realm: str, version: KeyVersion, key: bytes) -> None:
    """Cache ``key`` as the HMAC key of ``ref``'s active version ``version``."""
    try:
        crypto.check_encryption_key(app, ref, realm=realm)  # loads the entry, counts nothing
    except QimemError:
        return  # derived or deterministic keys have no such entry: not cached
    entry = app.cache.for_encrypt(realm, ref)
    if entry is None or entry.key_id != version.key_id:  # rotated meanwhile
        return
    if len(_ACTIVE_KEYS) >= _MAX_ACTIVE_KEYS:
        _ACTIVE_KEYS.clear()
    _ACTIVE_KEYS[id(entry)] = (entry, key)


def _encryption_hmac_key(app: AppContext, version: KeyVersion) -> bytes:
    material = app.store.material(version.realm, version.key_id)
    try:
        derived_key = transit_hmac_key(material)
    finally:
        zero(material)
    key = bytes(derived_key)
    zero(derived_key)
    return key


def _tag(app: AppContext, version: KeyVersion, purpose: str, hash_name: str, data: bytes) -> bytes:
    if purpose == "mac":
        entry = handles.version_entry(
            app, version.key_id, version.realm, "mac", "an HMAC", version.version
        )
        return bytes(entry.algorithm.mac(entry.handle, data))  # type: ignore[attr-defined]
    return _hmac.new(_encryption_hmac_key(app, version), data, _HASHES[hash_name]).digest()


def hmac(
    app: AppContext,
    ref: str,
    data: bytes,
    *,
    algorithm: str | None = None,
    key_version: int | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> HmacResult:
    """Vault's ``hmac/:name``: the HMAC of ``data`` under a version of ``ref``.

    :param algorithm: Vault's hash name (``sha2-256`` ... ``sha3-512``); for a MAC key,
        its own hash (given, it must agree).
    :param key_version: 0/None: the active version; else from ``min_encryption_version``
        to the active one.
    :raises ValidationError: ``invalid_algorithm``, ``wrong_purpose`` (a signing key).
    :raises KeyNotActiveError: ``key_version`` below ``min_encryption_version``.
    :raises ConflictError: the version is disabled, destroyed or pending deletion.
    :raises NotFoundError: no such key or version.
    """
    data = _data(data)
    if key_version in (None, 0):  # a MAC key that computed here before: macs' hot path
        refs = app.cache.handles.get(realm)
        entry = refs.get(ref) if refs is not None and isinstance(ref, str) else None
        own = _MAC_KEY_HASH.get(entry.algorithm_name) if entry is not None else None
        if entry is not None and entry.purpose == "mac" and algorithm in (None, own):
            made = macs.mac(app, ref, data, realm=realm, raw=True)
            if actor is not None:
                audit(app, realm, actor, "crypto.mac", made.key_id, buffered=True)
            text = f"vault:v{made.version}:{base64.b64encode(made.tag).decode('ascii')}"
            return HmacResult(text, made.key_id, made.version)
        cached = _cached(app, ref, realm) if algorithm in _HASHES or algorithm is None else None
        if cached is not None:  # an encryption key's active version, HMAC key cached
            active, key = cached
            tag = _hmac.new(key, data, _HASHES[algorithm or DEFAULT_ALGORITHM]).digest()
            if actor is not None:
                audit(app, realm, actor, "crypto.mac", active.key_id, buffered=True)
            text = f"vault:v{active.version}:{base64.b64encode(tag).decode('ascii')}"
            return HmacResult(text, active.key_id, active.version)
    version, purpose = _version(app, ref, key_version, realm)
    hash_name = _algorithm(purpose, version, algorithm)
    key_id, number = version.key_id, version.version
    if purpose == "mac" and version.state is KeyState.ACTIVE:
        made = macs.mac(app, ref, data, realm=realm, raw=True)  # cached under ref, checked
        tag, key_id, number = made.tag, made.key_id, made.version
    elif purpose != "mac" and version.state is KeyState.ACTIVE:
        key = _encryption_hmac_key(app, version)
        tag = _hmac.new(key, data, _HASHES[hash_name]).digest()
        _remember(app, ref, realm, version, key)
    else:
        tag = _tag(app, version, purpose, hash_name, data)
    if actor is not None:
        audit(app, realm, actor, "crypto.mac", key_id, buffered=True)
    return HmacResult(f"vault:v{number}:{base64.b64encode(tag).decode('ascii')}", key_id, number)


def parse_hmac(text: Any) -> tuple[int, bytes]:
    """``(version, tag)`` of ``vault:v<N>:<base64>``.

    :raises ValidationError: ``invalid_hmac``.
    """
    match = _TAG_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValidationError(
            "invalid HMAC: expected 'vault:v<N>:' and base64", code="invalid_hmac"
        )
    try:
        return int(match.group(1)), base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("invalid HMAC: bad base64", code="invalid_hmac") from None


def verify_hmac(
    app: AppContext,
    ref: str,
    data: bytes,
    tag: str,
    *,
    algorithm: str | None = None,
    realm: str = DEFAULT_REALM,
    actor: str | None = None,
) -> bool:
    """Vault's ``verify/:name`` with ``hmac``: whether ``tag`` (``vault:vN:``...) is the
    HMAC of ``data`` under version N of ``ref`` (constant-time comparison).

    :raises ValidationError: ``invalid_hmac``, ``invalid_algorithm``, ``wrong_purpose``.
    :raises ConflictError: version N is disabled, destroyed, pending deletion or below
        ``min_decryption_version`` (Vault: "too old").
    :raises NotFoundError: no key ``ref``, or no version N.
    """
    data = _data(data)
    number, raw = parse_hmac(tag)
    lineage_id, exact = resolve(app, ref, realm)
    version = version_of(app, lineage_id if exact else ref, number, realm)
    purpose = key_purpose(app, version)
    hash_name = _algorithm(purpose, version, algorithm)
    lifecycle.check_verification(app, version)
    expected = _tag(app, version, purpose, hash_name, data)
    valid = _hmac.compare_digest(expected, raw)
    if actor is not None:
        audit(app, realm, actor, "crypto.verify_mac", version.key_id, buffered=True, valid=valid)
    return valid
