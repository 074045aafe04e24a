"""Transit ``hmac``, ``sign`` and ``verify`` (single or ``batch_input``), bound to
``/v1/security``'s ``mac``, ``sign``, ``verify`` and ``verifyMac`` (same permissions, audit
and metrics).

* ``hmac/:name(/:algorithm)``: :mod:`qimem.services.transit_hmac`, on encryption keys (a
  per-version HKDF-derived HMAC key) and ``hmac`` keys; ``vault:vN:`` + base64.
* ``sign/:name(/:hash_algorithm)``: ``vault:vN:`` + the algorithm's bare signature in
  base64 (``marshaling_algorithm=jws``: base64url without padding, as Vault). qimem's
  signing keys hash with one hash each (ecdsa-p256 and rsa-3072: SHA-256; ecdsa-p384:
  SHA-384; rsa-4096: SHA-512): ``hash_algorithm`` may name it or be left out, another hash
  is refused. RSA keys pad with their own scheme (``signature_algorithm`` pss or pkcs1v15
  must agree); PSS salt is the digest length (``salt_length`` auto or hash). Ed25519 has no
  ``context`` here (qimem's signing keys are not derived). Only the active version signs
  (``key_version`` 0 or latest).
* ``verify/:name(/:hash_algorithm)``: ``signature`` or ``hmac`` (``cmac`` is refused),
  ``{"valid": bool}``; a signature names its version (``vault:vN:``).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from typing import Any

from qimem import services
from qimem.errors import QimemError
from qimem.server.transit.framework import (
    BatchAnswer,
    TransitOperation,
    TransitRequest,
    VaultError,
    b64_field,
    batch_input,
    boolean,
    error_text,
    integer,
    string,
    url_name,
)
from qimem.services import signing, transit_hmac

Item = Callable[[TransitRequest, str, dict[str, Any]], dict[str, Any]]
_HASHES = {"sha256": "sha2-256", "sha384": "sha2-384", "sha512": "sha2-512"}
_SIGNATURE = re.compile(r"vault:v([1-9][0-9]{0,9}):([A-Za-z0-9+/_-]*={0,2})\Z")


def _b64(data: bytes, jws: bool = False) -> str:
    if jws:
        return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")
    return base64.b64encode(data).decode("ascii")


def _input(item: dict[str, Any]) -> bytes:
    data = b64_field(item, "input", empty_is_none=False)
    if data is None:
        raise VaultError("missing input to process")
    return data


def _run(request: TransitRequest, item_call: Item) -> dict[str, Any] | BatchAnswer:
    """One item (the body), or each of ``batch_input`` with the body's other fields as
    defaults (errors per item, ``reference`` echoed)."""
    name = request.params["name"]
    items = batch_input(request.body)
    if items is None:
        return item_call(request, name, request.body)
    shared = {k: v for k, v in request.body.items() if k != "batch_input"}
    results: list[dict[str, Any]] = []
    failed = 0
    for item in items:
        try:
            result = item_call(request, name, {**shared, **item})
        except QimemError as exc:
            failed += 1
            result = {"error": error_text(exc)}
        if "reference" in item:
            result["reference"] = item["reference"]
        results.append(result)
    request.counts = (len(items) - failed, failed)
    return BatchAnswer.of(results, request.body)


# ---- hmac ------------------------------------------------------------------------------


def _algorithm(request: TransitRequest, item: dict[str, Any], *names: str) -> str | None:
    """The hash named in the URL (``{algorithm}``/``{hash_algorithm}``) or the body."""
    for name in names:
        found = request.params.get(name) or string(item, name)
        if found:
            return found
    return None


def _hmac_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    made = transit_hmac.hmac(
        request.app,
        name,
        _input(item),
        algorithm=_algorithm(request, item, "algorithm"),
        key_version=integer(item, "key_version"),
        realm=request.realm,
    )
    request.key_ref = made.key_id
    return {"hmac": made.hmac}


def _hmac(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    return _run(request, _hmac_item)


# ---- sign and verify --------------------------------------------------------------------


def _options(request: TransitRequest, name: str, item: dict[str, Any]) -> tuple[bool, str]:
    """``(prehashed, marshaling)``; the hash, padding, salt and context options checked
    against the key."""
    if item.get("context"):
        raise VaultError("context is not supported: qimem's signing keys are not derived")
    marshaling = string(item, "marshaling_algorithm") or "asn1"
    if marshaling not in ("asn1", "jws"):
        raise VaultError(f"unsupported marshaling algorithm {marshaling!r}: use asn1 or jws")
    wanted_hash = _algorithm(request, item, "hash_algorithm", "algorithm")
    padding = string(item, "signature_algorithm")
    salt = item.get("salt_length")
    if wanted_hash or padding or salt not in (None, "", "auto", "hash"):
        algorithm = services.show_key(request.app, name, realm=request.realm).algorithm
        own = _own_hash(request, algorithm)
        if wanted_hash and wanted_hash != own:
            raise VaultError(
                f"key {name} ({algorithm}) hashes with {own or 'none'}; hash_algorithm "
                f"{wanted_hash} is not supported for it"
            )
        scheme = "pss" if algorithm.startswith("rsa-pss") else "pkcs1v15"
        if padding and (not algorithm.startswith("rsa-") or padding != scheme):
            raise VaultError(f"signature_algorithm {padding} does not apply to key {name}")
        if salt not in (None, "", "auto", "hash"):
            raise VaultError("salt_length must be auto or hash (the digest length)")
    return boolean(item, "prehashed"), marshaling


def _own_hash(request: TransitRequest, algorithm: str) -> str | None:
    plugin = request.app.registry.algorithm(algorithm, "sign")
    own = getattr(plugin, "hash_name", None)
    return _HASHES.get(own, own) if own else None


def _sign_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    prehashed, marshaling = _options(request, name, item)
    wanted = integer(item, "key_version")
    made = signing.sign(
        request.app,
        name,
        _input(item),
        realm=request.realm,
        prehashed=prehashed,
        marshaling=marshaling,
        raw=True,
    )
    if wanted and wanted != made.version:
        raise VaultError(f"key_version {wanted} is not the latest; qimem signs with the latest")
    request.key_ref = made.key_id
    return {
        "signature": f"vault:v{made.version}:{_b64(made.signature, marshaling == 'jws')}",
        "key_version": made.version,
    }


def _sign(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    return _run(request, _sign_item)


def _parse_signature(text: Any, jws: bool) -> tuple[int, bytes]:
    match = _SIGNATURE.match(text) if isinstance(text, str) else None
    if match is None:
        raise VaultError("invalid signature: expected 'vault:v<N>:' and base64")
    body = match.group(2)
    try:
        if jws:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        else:
            raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise VaultError("invalid signature: bad base64") from None
    return int(match.group(1)), raw


def _verify_item(request: TransitRequest, name: str, item: dict[str, Any]) -> dict[str, Any]:
    data = _input(item)
    given = [k for k in ("signature", "hmac", "cmac") if item.get(k) is not None]
    if len(given) != 1:
        raise VaultError("give exactly one of signature or hmac")
    if given[0] == "cmac":
        raise VaultError("cmac is not supported: qimem has no CMAC keys")
    if given[0] == "hmac":
        valid = transit_hmac.verify_hmac(
            request.app,
            name,
            data,
            item["hmac"],
            algorithm=_algorithm(request, item, "hash_algorithm", "algorithm"),
            realm=request.realm,
        )
        return {"valid": valid}
    prehashed, marshaling = _options(request, name, item)
    number, raw = _parse_signature(item["signature"], marshaling == "jws")
    result = signing.verify(
        request.app,
        name,
        data,
        raw,
        realm=request.realm,
        prehashed=prehashed,
        marshaling=marshaling,
        raw=True,
        version=number,
    )
    return {"valid": result.valid}


def _verify(request: TransitRequest) -> dict[str, Any] | BatchAnswer:
    return _run(request, _verify_item)


_BATCH = ("batch_input", "reference", "partial_failure_response_code")
_HMAC_FIELDS = ("input", "key_version", "algorithm", *_BATCH)
_SIGN_FIELDS = (
    "input",
    "key_version",
    "hash_algorithm",
    "algorithm",
    "context",
    "prehashed",
    "signature_algorithm",
    "marshaling_algorithm",
    "salt_length",
    *_BATCH,
)
_VERIFY_FIELDS = (*_SIGN_FIELDS, "name", "signature", "hmac", "cmac")


def _hmac_names(app: Any, realm: str, body: Any, params: dict[str, Any]) -> list[str | None]:
    """The URL's key when the body (or a batch item) verifies an ``hmac``: verify binds
    the signature operation (``keys:verify``), and an HMAC needs ``keys:verify-mac`` too."""
    items = body.get("batch_input") if isinstance(body, dict) else None
    candidates = [body, *(items if isinstance(items, list) else [])]
    if any(isinstance(c, dict) and c.get("hmac") is not None for c in candidates):
        return url_name(app, realm, body, params)
    return []


_VERIFY_ALSO = (("keys:verify-mac", _hmac_names),)

OPERATIONS = (
    TransitOperation("transitHmac", "POST", "/hmac/{name}", _hmac, "mac", _HMAC_FIELDS),
    TransitOperation(
        "transitHmacAlgorithm", "POST", "/hmac/{name}/{algorithm}", _hmac, "mac", _HMAC_FIELDS
    ),
    TransitOperation("transitSign", "POST", "/sign/{name}", _sign, "sign", _SIGN_FIELDS),
    TransitOperation(
        "transitSignHash", "POST", "/sign/{name}/{hash_algorithm}", _sign, "sign", _SIGN_FIELDS
    ),
    TransitOperation(
        "transitVerify",
        "POST",
        "/verify/{name}",
        _verify,
        "verify",
        _VERIFY_FIELDS,
        also=_VERIFY_ALSO,
    ),
    TransitOperation(
        "transitVerifyHash",
        "POST",
        "/verify/{name}/{hash_algorithm}",
        _verify,
        "verify",
        _VERIFY_FIELDS,
        also=_VERIFY_ALSO,
    ),
)
