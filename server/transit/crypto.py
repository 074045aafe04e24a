"""Transit message endpoints: ``encrypt``, ``decrypt``, ``rewrap``, ``datakey`` — single or
``batch_input``, each bound to its ``/v1/security`` operation.

Fields: ``plaintext``/``ciphertext``, ``associated_data`` (qimem's ``aad``; rewrap and
datakey take it too, as OpenBao does), ``context`` (derived keys), ``key_version`` (qimem
encrypts with the latest version only: another one is refused), ``nonce`` (refused: qimem
has no convergent encryption), ``reference`` (echoed in batch results). In a batch only the
items' fields count, as in Vault; the answer is 400 when an item failed, unless
``partial_failure_response_code`` names another status and some items succeeded.

A ciphertext must have been sealed by the key named in the URL (any of its versions), and
its ``vN`` must be that version: both are checked before anything is decrypted.

A key restored from a Vault backup (its lineage flagged ``vault_layout_versions``; never
decided from the bytes) goes through :mod:`qimem.services.vault_import` instead: Vault's raw
layout for its imported versions, qimem envelopes after a rotation. The flag is read from
the store at most once per key-cache TTL per key name (:func:`vault_layout`), the staleness
bound the key cache already has.
"""

from __future__ import annotations

import base64
import time
import weakref
from collections.abc import Callable
from typing import Any

from qimem import envelope as env
from qimem import services
from qimem.app import AppContext
from qimem.errors import NotFoundError, QimemError
from qimem.keys import KeyVersion
from qimem.server.transit.ciphertext import format_ciphertext, parse_ciphertext
from qimem.server.transit.framework import (
    BatchAnswer,
    TransitOperation,
    TransitRequest,
    VaultError,
    b64_field,
    batch_input,
    error_text,
    integer,
)
from qimem.services import vault_import

Item = Callable[[TransitRequest, str, dict[str, Any]], dict[str, Any]]
_COMMON = ("context", "associated_data", "key_version", "nonce", "reference", "batch_input")
_DATAKEY_BITS = {128: 16, 256: 32, 512: 64}


_LAYOUTS: weakref.WeakKeyDictionary[AppContext, dict[tuple[str, str], tuple[float, bool]]]
_LAYOUTS = weakref.WeakKeyDictionary()
_MAX_LAYOUTS = 10_000


def vault_layout(request: TransitRequest, name: str) -> bool:
    """Whether ``name`` is a key restored from Vault (cached for the key cache's TTL); an
    unknown key is not (the regular path reports it)."""
    app, now = request.app, time.monotonic()
    known = _LAYOUTS.get(app)
    if known is None:
        known = _LAYOUTS.setdefault(app, {})
    hit = known.get((request.realm, name))
    if hit is not None and hit[0] > now:
        return hit[1]
    try:
        flag = vault_import.is_vault_layout(app, name, realm=request.realm)
    except NotFoundError:
        return False
    if len(known) >= _MAX_LAYOUTS:
        known.clear()
    known[(request.realm, name)] = (now + app.config.cache_ttl, flag)
    return flag


def _no_context(item: dict[str, Any]) -> None:
    if item.get("context"):
        raise VaultError("a key restored from Vault is not derived: context is not allowed")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _no_nonce(item: dict[str, Any]) -> None:
    if item.get("nonce"):
        raise VaultError("provided nonce not allowed for this key: qimem draws every nonce")


def check_latest(request: TransitRequest, name: str, item: dict[str, Any]) -> None:
    """A ``key_version`` other than 0 or the latest is refused (qimem seals with the
    active version only)."""
    wanted = integer(item, "key_version")
    if not wanted:
        return
    details = services.show_key(request.app, name, realm=request.realm)
    active = details.active
    if active is None or wanted != active.version:
        raise VaultError(
            f"key_version {wanted} is not the latest version; qimem encrypts with the latest "
            "version only"
        )


def sealing_version(request: TransitRequest, name: str, blob: bytes, key_id: str) -> KeyVersion:
    """The key version that sealed ``blob``, which must belong to the key ``name``.

    :raises VaultError: (400) no such key version here, or another key's.
    """
    realm = request.realm
    cached = request.app.cache.by_prefix.get(blob[: env.PREFIX_SIZE])
    if cached is not None and cached.realm == realm:
        version = cached.meta
    else:
        try:
            version = request.app.store.get(realm, key_id)
        except NotFoundError:
            raise VaultError("invalid ciphertext: no key of this realm sealed it") from None
    if name not in (version.name, version.lineage_id, version.key_id):
        raise VaultError(f"invalid ciphertext: it was not sealed by the key {name}")
    return version


def _opened(request: TransitRequest, name: str, item: dict[str, Any]) -> bytes:
    """The envelope bytes of ``item["ciphertext"]``, checked against the key ``name``."""
    _no_nonce(item)
    _, blob, parsed = parse_ciphertext(item.get("ciphertext"))
    sealing_version(request, name, blob, parsed.key_id_str)
    return blob


def _encrypt_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    plaintext = b64_field(item, "plaintext", empty_is_none=False)
    if plaintext is None:
        raise VaultError("missing plaintext to encrypt")
    _no_nonce(item)
    check_latest(request, name, item)
    if vault_layout(request, name):
        _no_context(item)
        made = vault_import.encrypt_vault(
            request.app, name, plaintext, aad=b64_field(item, "associated_data"),
            realm=request.realm,
        )  # fmt: skip
        request.key_ref = made.key_id
        return {"ciphertext": made.ciphertext, "key_version": made.version}
    sealed = services.encrypt(
        request.app,
        name,
        plaintext,
        aad=b64_field(item, "associated_data"),
        realm=request.realm,
        context=b64_field(item, "context"),
    )
    request.key_ref = sealed.key_id
    return {
        "ciphertext": format_ciphertext(sealed.version, sealed.envelope),
        "key_version": sealed.version,
    }


def _decrypt_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    if vault_layout(request, name):
        _no_nonce(item)
        _no_context(item)
        text = item.get("ciphertext")
        if not isinstance(text, str):
            raise VaultError("missing ciphertext to decrypt")
        result = vault_import.decrypt_vault(
            request.app, name, text, aad=b64_field(item, "associated_data"), realm=request.realm
        )
        request.key_ref = result.key_id
        return {"plaintext": _b64(result.plaintext)}
    opened = services.decrypt(
        request.app,
        _opened(request, name, item),
        aad=b64_field(item, "associated_data"),
        realm=request.realm,
        context=b64_field(item, "context"),
    )
    request.key_ref = opened.key_id
    return {"plaintext": _b64(opened.plaintext)}


def _rewrap_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    if vault_layout(request, name):
        _no_nonce(item)
        _no_context(item)
        check_latest(request, name, item)
        text = item.get("ciphertext")
        if not isinstance(text, str):
            raise VaultError("missing ciphertext to rewrap")
        made = vault_import.rewrap_vault(
            request.app, name, text, aad=b64_field(item, "associated_data"), realm=request.realm
        )
        request.key_ref = made.key_id
        return {"ciphertext": made.ciphertext, "key_version": made.version}
    blob = _opened(request, name, item)
    check_latest(request, name, item)
    sealed = services.rewrap(
        request.app,
        blob,
        aad=b64_field(item, "associated_data"),
        realm=request.realm,
        context=b64_field(item, "context"),
    )
    request.key_ref = sealed.key_id
    return {
        "ciphertext": format_ciphertext(sealed.version, sealed.envelope),
        "key_version": sealed.version,
    }


def _run(request: TransitRequest, item_call: Item) -> dict[str, Any] | BatchAnswer:
    """One item, or each item of ``batch_input`` (errors per item, references echoed)."""
    name = request.params["name"]
    items = batch_input(request.body)
    if items is None:
        return item_call(request, name, request.body)
    results: list[dict[str, Any]] = []
    failed = 0
    for item in items:
        try:
            result = item_call(request, name, item)
        except QimemError as exc:
            failed += 1
            result = {"error": error_text(exc)}
        if "reference" in item:
            result["reference"] = item["reference"]
        results.append(result)
    request.counts = (len(items) - failed, failed)
    request.key_ref = None if failed else request.key_ref
    return BatchAnswer.of(results, request.body)


def _encrypt(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    if request.body.get("convergent_encryption") or request.body.get("type") not in (
        None,
        "",
        "aes256-gcm96",
    ):
        raise VaultError("encrypt never creates a key here; create it with keys/:name first")
    return _run(request, _encrypt_item)


def _decrypt(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    return _run(request, _decrypt_item)


def _rewrap(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    return _run(request, _rewrap_item)


def _datakey(request: TransitRequest) -> dict[str, Any]:
    kind = request.params["type"]
    if kind not in ("plaintext", "wrapped"):
        raise VaultError("invalid type: must be plaintext or wrapped")
    name = request.params["name"]
    bits = integer(request.body, "bits", 256)
    if bits not in _DATAKEY_BITS:
        raise VaultError("bits must be 128, 256 or 512")
    _no_nonce(request.body)
    check_latest(request, name, request.body)
    if vault_layout(request, name):
        _no_context(request.body)
        if request.body.get("associated_data"):
            raise VaultError("a key restored from Vault makes data keys without associated_data")
        data_key, made = vault_import.datakey_vault(
            request.app, name, bits=bits, realm=request.realm
        )
        request.key_ref = made.key_id
        answer: dict[str, Any] = {"ciphertext": made.ciphertext, "key_version": made.version}
        if kind == "plaintext":
            answer["plaintext"] = _b64(data_key)
        return answer
    key = services.datakey(
        request.app,
        name,
        realm=request.realm,
        size=_DATAKEY_BITS[bits],
        context=b64_field(request.body, "context"),
        aad=b64_field(request.body, "associated_data"),
        wrapped_only=kind == "wrapped",
    )
    request.key_ref = key.key_id
    data: dict[str, Any] = {
        "ciphertext": format_ciphertext(key.version, key.wrapped_key),
        "key_version": key.version,
    }
    if key.plaintext_key is not None:
        data["plaintext"] = _b64(key.plaintext_key)
    return data


def _ignored(*names: str) -> tuple[str, ...]:
    return (*_COMMON, "partial_failure_response_code", *names)


OPERATIONS = (
    TransitOperation(
        "transitEncrypt",
        "POST",
        "/encrypt/{name}",
        _encrypt,
        "encrypt",
        _ignored("plaintext", "type", "convergent_encryption"),
    ),
    TransitOperation(
        "transitDecrypt", "POST", "/decrypt/{name}", _decrypt, "decrypt", _ignored("ciphertext")
    ),  # fmt: skip
    TransitOperation(
        "transitRewrap", "POST", "/rewrap/{name}", _rewrap, "rewrap", _ignored("ciphertext")
    ),  # fmt: skip
    TransitOperation(
        "transitDataKey",
        "POST",
        "/datakey/{type}/{name}",
        _datakey,
        "datakey",
        ("context", "associated_data", "key_version", "nonce", "bits"),
    ),
)
