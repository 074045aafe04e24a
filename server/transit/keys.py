"""Transit key endpoints: ``keys/:name`` create, read, delete; ``keys`` list; ``config``,
``rotate`` and ``trim`` — each bound to the ``/v1/security`` operation it shares
permission and audit with.

Mapping (docs/transit.md): ``type`` → algorithm (:mod:`.keytypes`); ``derived`` → a derived
key; ``auto_rotate_period`` → ``auto_rotate_seconds``; ``deletion_allowed`` → ``not
deletion_protection``; DELETE → a *scheduled* deletion after the deployment's minimum
waiting period (the key refuses use at once; ``qimem keys cancel-deletion`` undoes it);
``trim`` → destroying the versions below ``min_available_version``. ``convergent_encryption``,
``exportable`` and ``allow_plaintext_backup`` set true are refused: qimem never exports
secret keys in plaintext.
"""

from __future__ import annotations

import re
from typing import Any

from qimem import services
from qimem.errors import NotFoundError
from qimem.keys import KeyState
from qimem.server.transit.framework import (
    TransitOperation,
    TransitRequest,
    VaultError,
    boolean,
    integer,
    string,
)
from qimem.server.transit.keytypes import algorithm_of, type_of
from qimem.services import lifecycle

#: Vault's minimum auto-rotation period (0 turns it off).
MIN_AUTO_ROTATE = 3600
_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")
_SUPPORTS = {  # purpose → (encryption, decryption, derivation, signing)
    "encrypt": (True, True, True, False),
    "deterministic": (True, True, False, False),
    "sign": (False, False, False, True),
    "mac": (False, False, False, False),
}


def refuse_export_flags(body: dict[str, Any]) -> None:
    """qimem never exports a secret key in plaintext, nor derives nonces (convergent)."""
    for flag in ("exportable", "allow_plaintext_backup"):
        if boolean(body, flag):
            raise VaultError(
                f"{flag} is not supported: qimem never exports secret keys in plaintext"
            )
    if boolean(body, "convergent_encryption"):
        raise VaultError("convergent_encryption is not supported (see qimem's deterministic keys)")


def auto_rotate_seconds(body: dict[str, Any]) -> int | None | bool:
    """``auto_rotate_period`` in seconds: ``False`` when absent, ``None`` for 0 (off);
    Vault's forms: an integer of seconds or a duration such as ``"24h"``, ``"90m"``."""
    value = body.get("auto_rotate_period")
    if value is None:
        return False
    if isinstance(value, str) and not value.isdigit():
        found = _DURATION.match(value)
        if found is None or not value:
            raise VaultError("auto_rotate_period must be seconds or a duration like '24h'")
        hours, minutes, seconds = (int(g or 0) for g in found.groups())
        value = hours * 3600 + minutes * 60 + seconds
    else:
        value = integer(body, "auto_rotate_period")
    assert isinstance(value, int)
    if value == 0:
        return None
    if value < MIN_AUTO_ROTATE:
        raise VaultError("auto rotate period must be 0 to disable or at least an hour")
    return value


def key_data(request: TransitRequest, name: str) -> dict[str, Any]:
    """Vault's answer to ``GET keys/:name`` for the qimem key ``name``."""
    app, realm = request.app, request.realm
    details = services.show_key(app, name, realm=realm)
    policy = lifecycle.get_policy(app, details.lineage_id, realm=realm)
    request.key_ref = details.versions[-1].key_id
    live = [v for v in details.versions if v.state is not KeyState.DESTROYED]
    encryption, decryption, derivation, signing = _SUPPORTS.get(
        details.purpose, (False, False, False, False)
    )
    active = details.active
    data: dict[str, Any] = {
        "name": details.name or details.lineage_id,
        "type": type_of(details.algorithm),
        "keys": {str(v.version): int(v.created_at.timestamp()) for v in live},
        "latest_version": active.version if active else details.versions[-1].version,
        "min_available_version": live[0].version if live else 0,
        "min_decryption_version": policy.min_decryption_version,
        "min_encryption_version": policy.min_encryption_version,
        "deletion_allowed": not policy.deletion_protection,
        "derived": policy.derived,
        "exportable": False,
        "allow_plaintext_backup": False,
        "convergent_encryption": False,
        "imported_key": policy.vault_layout,  # restored from a Vault backup
        "auto_rotate_period": policy.auto_rotate_seconds or 0,
        "supports_encryption": encryption,
        "supports_decryption": decryption,
        "supports_derivation": derivation and policy.derived,
        "supports_signing": signing,
    }
    if policy.derived:
        data["kdf"] = "hkdf_sha256"
    if policy.deletion_date is not None:  # qimem's: the key refuses use until then
        data["deletion_date"] = policy.deletion_date.isoformat()
    return data


def _apply_policy(request: TransitRequest, name: str, body: dict[str, Any]) -> None:
    changes: dict[str, Any] = {}
    for field in ("min_decryption_version", "min_encryption_version"):
        value = integer(body, field)
        if value is not None:
            if value < 0:
                raise VaultError(f"{field} cannot be negative")
            changes[field] = max(value, 1)  # Vault's 0: no minimum (qimem's 1)
    if body.get("deletion_allowed") is not None:
        changes["deletion_protection"] = not boolean(body, "deletion_allowed")
    seconds = auto_rotate_seconds(body)
    if seconds is not False:
        changes["auto_rotate_seconds"] = seconds
    if changes:
        lifecycle.set_policy(request.app, name, realm=request.realm, actor=request.actor, **changes)


def _create(request: TransitRequest) -> dict[str, Any]:
    name = request.params["name"]
    body = request.body
    refuse_export_flags(body)
    algorithm = algorithm_of(string(body, "type"))
    seconds = auto_rotate_seconds(body)  # checked before anything is created
    try:
        services.show_key(request.app, name, realm=request.realm)
    except NotFoundError:
        pass
    else:  # Vault: creating an existing key changes nothing and succeeds
        request.warnings.append(f"key {name} already existed; nothing was changed")
        return key_data(request, name)
    services.create_key(
        request.app,
        algorithm=algorithm,
        name=name,
        realm=request.realm,
        derived=boolean(body, "derived"),
    )
    if seconds is not False and seconds is not None:
        lifecycle.set_policy(request.app, name, realm=request.realm, auto_rotate_seconds=seconds)
    return key_data(request, name)


def _read(request: TransitRequest) -> dict[str, Any]:
    return key_data(request, request.params["name"])


def _list(request: TransitRequest) -> dict[str, Any]:
    if not request.listing:
        raise VaultError("unsupported path", 405)
    names = sorted(
        k.name or k.lineage_id for k in services.list_keys(request.app, realm=request.realm)
    )
    if not names:  # Vault answers an empty list with 404
        raise NotFoundError("no keys")
    return {"keys": names}


def _delete(request: TransitRequest) -> None:
    name = request.params["name"]
    policy = lifecycle.get_policy(request.app, name, realm=request.realm)
    if policy.deletion_protection:
        raise VaultError("deletion is not allowed for this key")
    lifecycle.schedule_deletion(
        request.app,
        name,
        days=lifecycle.settings(request.app).min_deletion_days,
        realm=request.realm,
        actor=request.actor,
    )
    return None


def _config(request: TransitRequest) -> dict[str, Any]:
    name = request.params["name"]
    refuse_export_flags(request.body)
    _apply_policy(request, name, request.body)
    return key_data(request, name)


def _rotate(request: TransitRequest) -> dict[str, Any]:
    name = request.params["name"]
    if request.body.get("managed_key_name") or request.body.get("external_key_ref"):
        raise VaultError("managed and external keys are not supported")
    services.rotate_key(request.app, name, realm=request.realm)
    return key_data(request, name)


def _trim(request: TransitRequest) -> dict[str, Any]:
    name = request.params["name"]
    wanted = integer(request.body, "min_available_version")
    if wanted is None or wanted < 1:
        raise VaultError("missing or invalid min_available_version")
    policy = lifecycle.get_policy(request.app, name, realm=request.realm)
    if wanted > min(policy.min_decryption_version, policy.min_encryption_version):
        raise VaultError(
            "cannot set min_available_version above min_decryption_version or "
            "min_encryption_version"
        )
    details = services.show_key(request.app, name, realm=request.realm)
    for version in details.versions:
        if version.version < wanted and version.state is not KeyState.DESTROYED:
            lifecycle.destroy_version(
                request.app,
                version.key_id,
                realm=request.realm,
                actor=request.actor,
            )
    return key_data(request, name)


_CREATE_FIELDS = (
    "type",
    "derived",
    "convergent_encryption",
    "exportable",
    "allow_plaintext_backup",
    "auto_rotate_period",
    "key_size",
)
_CONFIG_FIELDS = (
    "min_decryption_version",
    "min_encryption_version",
    "deletion_allowed",
    "exportable",
    "allow_plaintext_backup",
    "auto_rotate_period",
)

OPERATIONS = (
    TransitOperation(
        "transitCreateKey", "POST", "/keys/{name}", _create, "createKey", _CREATE_FIELDS
    ),
    TransitOperation("transitReadKey", "GET", "/keys/{name}", _read, "showKey"),
    TransitOperation("transitListKeys", "GET", "/keys", _list, "listKeys", key_names=None),
    TransitOperation("transitDeleteKey", "DELETE", "/keys/{name}", _delete, "scheduleKeyDeletion"),
    TransitOperation(
        "transitConfigKey", "POST", "/keys/{name}/config", _config, "setKeyPolicy", _CONFIG_FIELDS
    ),
    TransitOperation(
        "transitRotateKey",
        "POST",
        "/keys/{name}/rotate",
        _rotate,
        "rotate",
        ("managed_key_name", "external_key_ref"),
    ),
    TransitOperation(
        "transitTrimKey",
        "POST",
        "/keys/{name}/trim",
        _trim,
        "destroyKeyVersion",
        ("min_available_version",),
    ),
)
