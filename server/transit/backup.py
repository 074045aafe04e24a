"""Transit ``backup/:name`` and ``restore(/:name)``.

``GET backup/:name`` is refused (400) by design: Vault's backup is the key material in
plaintext, and qimem never exports key material unsealed. qimem's own backup is
``POST /v1/security/keys/{key}/export {passphrase}`` (Argon2id + AES-256-GCM), restored
with ``POST /v1/security/import`` (docs/transit.md, "Backup and restore").

``POST restore(/:name)`` imports a **Vault** backup (base64 of Vault's ``KeyData`` JSON, an
``aes256-gcm96`` or ``chacha20-poly1305`` key) as a key in Vault's layout, whose existing
``vault:vN:`` ciphertexts decrypt (:mod:`qimem.services.vault_import`). The name is the
URL's, else the body's ``name``, else the one inside the backup. ``force`` is accepted,
but qimem never overwrites a key: a taken name is refused either way. Both are realm
administration (``realms:admin``), as qimem's export and import are.
"""

from __future__ import annotations

from typing import Any

from qimem.server.transit.framework import (
    TransitOperation,
    TransitRequest,
    VaultError,
    boolean,
    string,
    url_name,
)
from qimem.services import vault_import


def _backup(request: TransitRequest) -> dict[str, Any]:
    raise VaultError(
        "qimem never exports key material in plaintext, so it has no Vault backup; back up "
        "with POST /v1/security/keys/{key}/export {passphrase} (sealed with Argon2id) and "
        "restore with POST /v1/security/import"
    )


def _restore(request: TransitRequest) -> None:
    backup = string(request.body, "backup")
    if not backup:
        raise VaultError("'backup' must be supplied")
    name = request.params.get("name") or string(request.body, "name")
    key = vault_import.restore_vault_backup(
        request.app,
        backup,
        name=name,
        realm=request.realm,
        force=boolean(request.body, "force"),
        actor=request.actor,
    )
    request.key_ref = key.key_id
    return None


def _body_name(app: Any, realm: str, body: Any, params: dict[str, Any]) -> list[str | None]:
    name = body.get("name") if isinstance(body, dict) else None
    return [name if isinstance(name, str) else None]


_RESTORE_FIELDS = ("backup", "name", "force")

OPERATIONS = (
    TransitOperation("transitBackup", "GET", "/backup/{name}", _backup, "exportKey"),
    TransitOperation(
        "transitRestore",
        "POST",
        "/restore",
        _restore,
        "importKeys",
        _RESTORE_FIELDS,
        key_names=_body_name,
    ),
    TransitOperation(
        "transitRestoreName",
        "POST",
        "/restore/{name}",
        _restore,
        "importKeys",
        _RESTORE_FIELDS,
        key_names=url_name,
    ),
)
