"""Key backup and restore: lineages sealed under a passphrase (Argon2id + AES-256-GCM).

A backup file is a small JSON document::

    {"format": "qimem-key-backup", "version": 1,
     "kdf": {"name": "argon2id", "salt": B64, "time_cost": 3, "memory_kib": 65536,
             "parallelism": 4},
     "cipher": "aes-256-gcm", "nonce": B64, "ciphertext": B64}

The AES-256-GCM key is Argon2id(passphrase, salt) (RFC 9106's second recommended
parameters); everything in the document except ``ciphertext`` is bound as associated
data, so no parameter can be changed unnoticed. The sealed payload holds every exported
lineage: ids, name, realm, algorithm, policy, and each version's key_id, number, state,
creation time, usage count and material (none for destroyed versions). Key material is
never written in the clear. Restoring keeps every id, so envelopes and files sealed
before the backup decrypt after a restore into a fresh store.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from argon2.low_level import Type, hash_secret_raw
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem.app import AppContext
from qimem.crypto import zero
from qimem.errors import ConflictError, DecryptionError, NotFoundError, ValidationError
from qimem.keys import (
    DEFAULT_REALM,
    KeyState,
    LineagePolicy,
    LineageRecord,
    VersionRecord,
    parse_uuid,
    validate_name,
    validate_realm,
)
from qimem.services import lifecycle
from qimem.services.keys import resolve
from qimem.services.lifecycle_common import purpose_of_algorithm

FORMAT = "qimem-key-backup"
FORMAT_VERSION = 1
#: RFC 9106 §4, second recommended option: t=3, m=64 MiB, p=4.
DEFAULT_KDF = {"time_cost": 3, "memory_kib": 64 * 1024, "parallelism": 4}
_KDF_LIMITS = {"time_cost": (1, 20), "memory_kib": (8 * 1024, 1024 * 1024), "parallelism": (1, 16)}
MIN_PASSPHRASE = 8
#: A version number a signature, tag or envelope header can hold (uint32, from 1).
_MAX_VERSION = 2**32 - 1
#: The most uses a restored count may claim (a store's counter is a signed 64-bit integer).
_MAX_COUNT = 2**63 - 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("not base64")
    return base64.b64decode(value, validate=True)


def _passphrase(passphrase: bytes | str) -> bytes:
    data = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
    if len(data) < MIN_PASSPHRASE:
        raise ValidationError(
            f"the backup passphrase must be at least {MIN_PASSPHRASE} bytes", code="weak_passphrase"
        )
    return data


def _derive(passphrase: bytes, salt: bytes, kdf: dict[str, int]) -> bytearray:
    return bytearray(
        hash_secret_raw(
            passphrase,
            salt,
            time_cost=kdf["time_cost"],
            memory_cost=kdf["memory_kib"],
            parallelism=kdf["parallelism"],
            hash_len=32,
            type=Type.ID,
        )
    )


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


# -- export ------------------------------------------------------------------------------


def _lineage_record(app: AppContext, realm: str, lineage_id: str) -> dict[str, Any]:
    store = app.store
    versions = store.versions(realm, lineage_id)
    policy = store.policy(realm, lineage_id)
    usage = store.usage(realm, lineage_id)
    first = versions[0]
    items = []
    for version in versions:
        material = None
        if version.state is not KeyState.DESTROYED:
            buffer = store.material(realm, version.key_id)
            material = _b64(bytes(buffer))
            zero(buffer)
        items.append(
            {
                "key_id": version.key_id,
                "version": version.version,
                "state": version.state.value,
                "created_at": version.created_at.isoformat(),
                "encryptions": usage.get(version.key_id, 0),
                "material": material,
            }
        )
    return {
        "lineage_id": lineage_id,
        "realm": realm,
        "name": first.name,
        "algorithm": first.algorithm,
        "created_at": first.created_at.isoformat(),
        "policy": policy.to_dict(),
        "versions": items,
    }


def seal(
    payload: dict[str, Any], passphrase: bytes | str, kdf: dict[str, int] | None = None
) -> bytes:
    """Seal a payload document under ``passphrase``; the bytes of a backup file."""
    secret = _passphrase(passphrase)
    params = dict(kdf or DEFAULT_KDF)
    salt, nonce = os.urandom(16), os.urandom(12)
    header = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kdf": {"name": "argon2id", "salt": _b64(salt), **params},
        "cipher": "aes-256-gcm",
        "nonce": _b64(nonce),
    }
    key = _derive(secret, salt, params)
    plaintext = bytearray(json.dumps(payload, sort_keys=True).encode())
    try:
        ciphertext = AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), _aad(header))
    finally:
        zero(key)
        zero(plaintext)
    document = {**header, "ciphertext": _b64(ciphertext)}
    return (json.dumps(document, indent=1, sort_keys=True) + "\n").encode()


def export_keys(
    app: AppContext,
    refs: Iterable[str] | None,
    passphrase: bytes | str,
    *,
    realm: str = DEFAULT_REALM,
    kdf: dict[str, int] | None = None,
    actor: str | None = None,
) -> bytes:
    """A backup of the lineages ``refs`` name in ``realm`` (key_id, lineage_id or name), or
    with ``refs=None`` of every lineage in every realm (a whole-store backup)."""
    _passphrase(passphrase)  # refuse a weak passphrase before reading any key
    if refs is None:
        targets = app.store.lineages()
    else:
        validate_realm(realm)
        targets = list(dict.fromkeys((realm, resolve(app, ref, realm)[0]) for ref in refs))
        if not targets:
            raise ValidationError("name at least one key to export")
    payload = {
        "created_at": datetime.now(UTC).isoformat(),
        "lineages": [_lineage_record(app, r, lineage) for r, lineage in targets],
    }
    sealed = seal(payload, passphrase, kdf)
    for target_realm, lineage_id in targets:
        lifecycle.audit(app, target_realm, actor, "keys.export", lineage_id)
    return sealed


# -- import ------------------------------------------------------------------------------


def _kdf_params(kdf: Any) -> tuple[bytes, dict[str, int]]:
    if not isinstance(kdf, dict) or kdf.get("name") != "argon2id":
        raise ValueError("kdf")
    params: dict[str, int] = {}
    for name, (low, high) in _KDF_LIMITS.items():
        value = kdf.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValidationError(
                f"the backup's Argon2id {name} is out of range", code="invalid_backup"
            )
        params[name] = value
    salt = _unb64(kdf.get("salt"))
    if len(salt) < 16:
        raise ValueError("salt")
    return salt, params


def open_backup(data: bytes, passphrase: bytes | str) -> dict[str, Any]:
    """The payload of a backup file.

    :raises ValidationError: ``invalid_backup`` (not a qimem key backup, or malformed).
    :raises DecryptionError: ``backup_decryption_failed`` (wrong passphrase or tampered).
    """
    secret = _passphrase(passphrase)
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError("format")
        if document.get("version") != FORMAT_VERSION or document.get("cipher") != "aes-256-gcm":
            raise ValidationError("unsupported backup version or cipher", code="invalid_backup")
        salt, params = _kdf_params(document.get("kdf"))
        nonce = _unb64(document.get("nonce"))
        ciphertext = _unb64(document.get("ciphertext"))
        if len(nonce) != 12:
            raise ValueError("nonce")
    except ValidationError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise ValidationError("the file is not a qimem key backup", code="invalid_backup") from None
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    key = _derive(secret, salt, params)
    try:
        plaintext = AESGCM(bytes(key)).decrypt(nonce, ciphertext, _aad(header))
    except InvalidTag:
        raise DecryptionError(
            "the backup cannot be opened: wrong passphrase, or the file was changed",
            code="backup_decryption_failed",
        ) from None
    finally:
        zero(key)
    try:
        payload = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise ValidationError("the backup's content is malformed", code="invalid_backup") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("lineages"), list):
        raise ValidationError("the backup's content is malformed", code="invalid_backup")
    return payload


def _record(app: AppContext, item: dict[str, Any], realm: str | None) -> LineageRecord:
    target = validate_realm(realm or item["realm"])
    name = item.get("name")
    if name is not None:
        validate_name(name)
    purpose = purpose_of_algorithm(app, item["algorithm"])
    algo = app.registry.algorithm(item["algorithm"], purpose)
    algorithm = algo.name
    versions = []
    for version in item["versions"]:
        material = version.get("material")
        state = KeyState(version["state"])
        if (material is None) != (state is KeyState.DESTROYED):
            raise ValueError("material")
        # Ids and numbers as the store makes them: a signature, tag or envelope header holds
        # the key id as 16 UUID bytes and the version as uint32 (red team, issue 16: a
        # restored "not-a-uuid" or 2^33 made every use of the key an internal error, and a
        # negative usage count lifted the key's usage limit and nonce bound).
        key_id = _canonical_id(version["key_id"])
        number = _integer(version["version"], 1, _MAX_VERSION)
        encryptions = _integer(version.get("encryptions", 0), 0, _MAX_COUNT)
        raw = bytearray(_unb64(material)) if material is not None else None
        if raw is not None:
            _check_material(algo, purpose, raw)
        versions.append(
            VersionRecord(
                key_id=key_id,
                version=number,
                state=state,
                created_at=datetime.fromisoformat(version["created_at"]),
                encryptions=encryptions,
                material=raw,
            )
        )
    if not versions or sum(v.state is KeyState.ACTIVE for v in versions) > 1:
        raise ValueError("versions")
    if len({v.version for v in versions}) != len(versions):
        raise ValueError("versions")
    if len({v.key_id for v in versions}) != len(versions):
        raise ValueError("versions")
    return LineageRecord(
        lineage_id=_canonical_id(item["lineage_id"]),
        realm=target,
        name=name,
        algorithm=algorithm,
        created_at=datetime.fromisoformat(item["created_at"]),
        policy=LineagePolicy.from_dict(item.get("policy") or {}),
        versions=versions,
    )


def _canonical_id(value: Any) -> str:
    """``value`` if it is a UUID in canonical form (as the store makes ids).

    :raises ValueError: it is not (the caller answers ``invalid_backup``)."""
    if not isinstance(value, str) or parse_uuid(value) is None:
        raise ValueError("id")
    return value


def _integer(value: Any, low: int, high: int) -> int:
    """``value`` if it is an integer from ``low`` to ``high``. :raises ValueError: not."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError("number")
    return value


def _check_material(algorithm: Any, purpose: str, material: bytearray) -> None:
    """Refuse key material its algorithm cannot use (a backup is authenticated, but may
    come from another qimem, or be crafted by whoever knows the passphrase): a signing key
    must load as the algorithm's private key (fully checked: RSA's consistency checks
    run), any other key must have the algorithm's ``key_size``.

    :raises ValidationError: ``invalid_backup``, naming the algorithm.
    """
    if purpose == "sign":
        try:
            algorithm.signer(material)
        except ValidationError:
            raise ValidationError(
                f"the backup holds a {algorithm.name} key that is not a valid private key",
                code="invalid_backup",
            ) from None
        return
    size = getattr(algorithm, "key_size", None)
    if isinstance(size, int) and len(material) != size:
        raise ValidationError(
            f"the backup holds a {algorithm.name} key of {len(material)} bytes, not {size}",
            code="invalid_backup",
        )


def _exists(app: AppContext, record: LineageRecord) -> bool:
    for ref in filter(None, (record.lineage_id, record.name)):
        try:
            app.store.find_lineage(record.realm, ref)
            return True
        except NotFoundError:
            pass
    return False


def import_keys(
    app: AppContext,
    data: bytes,
    passphrase: bytes | str,
    *,
    realm: str | None = None,
    actor: str | None = None,
) -> list[LineageRecord]:
    """Restore every lineage of a backup (ids, versions, states, policy, usage counts).

    ``realm`` puts them all into that realm; ``None`` keeps each lineage's own realm (a
    whole-store restore). Nothing is restored if any lineage already exists.

    :raises ConflictError: ``key_exists`` / ``name_taken``.
    """
    payload = open_backup(data, passphrase)
    try:
        records = [_record(app, item, realm) for item in payload["lineages"]]
    except (KeyError, TypeError, ValueError):
        raise ValidationError("the backup's content is malformed", code="invalid_backup") from None
    try:
        clashes = [r for r in records if _exists(app, r)]
        if clashes:
            first = clashes[0]
            raise ConflictError(
                f"key {first.name or first.lineage_id} already exists in realm {first.realm!r}; "
                "nothing was restored",
                code="key_exists",
            )
        for record in records:
            app.store.restore_lineage(record)
            lifecycle.audit(app, record.realm, actor, "keys.import", record.lineage_id)
    finally:
        for record in records:
            for version in record.versions:
                if version.material is not None:
                    zero(version.material)
        app.cache.clear()
    return records
