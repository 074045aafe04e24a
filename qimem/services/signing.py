"""Sign and verify with signing keys (purpose ``sign``), and export their public keys.

A signature names the key version that made it (a 26-byte header, docs/formats.md
"Signatures and tags v1"), so it verifies after the key is rotated; ``raw=True`` gives and
takes the algorithm's bare signature, for third-party verifiers. Verification answers
``valid=False`` for any signature that does not verify, malformed ones and ones naming a
version of another key included, and raises only for what the caller controls (a key that
does not exist or has another purpose, a version that may not verify, bad options).

The hot path is one dict lookup in the key cache (:mod:`qimem.services.handles`) and one
call of the loaded signer or verifier. The results are slotted records, not frozen
dataclasses (as :mod:`qimem.services.crypto`'s): a frozen dataclass's ``__init__`` costs a
third of an HMAC; treat them as read-only.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from qimem.app import AppContext
from qimem.crypto_purposes import MARSHALINGS
from qimem.errors import ValidationError
from qimem.keys import DEFAULT_REALM
from qimem.services import handles
from qimem.services.lifecycle_common import audit, require_purpose

__all__ = [
    "PublicKeyResult",
    "SignResult",
    "VerifyResult",
    "public_key",
    "public_keys",
    "sign",
    "verify",
]

_HEADER_SIZE = handles.HEADER_SIZE
_BYTES = (bytes, bytearray, memoryview)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(slots=True)
class SignResult:
    """A signature and the key version that made it (a record: treat it as read-only)."""

    signature: bytes = field(repr=False)
    key_id: str
    version: int
    algorithm: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "signature": _b64(self.signature),
            "key_id": self.key_id,
            "version": self.version,
            "algorithm": self.algorithm,
        }


@dataclass(slots=True)
class VerifyResult:
    """Whether a signature or MAC tag is valid, and the key version that verified it
    (``None`` for an invalid one). Use ``.valid``: a result is not a truth value, so
    ``if verify(...)`` cannot pass an invalid signature by mistake."""

    valid: bool
    key_id: str | None = None
    version: int | None = None

    def __bool__(self) -> bool:
        raise TypeError("test VerifyResult.valid, not the result itself")

    def to_dict(self) -> dict[str, Any]:
        return {"valid": self.valid, "key_id": self.key_id, "version": self.version}


@dataclass(frozen=True)
class PublicKeyResult:
    """A signing key version's public key, as PEM (SubjectPublicKeyInfo) and as a JWK
    (public members only; ``kid`` is the key_id)."""

    key_id: str
    version: int
    algorithm: str
    pem: str
    jwk: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "version": self.version,
            "algorithm": self.algorithm,
            "pem": self.pem,
            "jwk": self.jwk,
        }


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, _BYTES):
        raise ValidationError(f"{what} must be bytes")
    return bytes(value)


def _ref(ref: Any) -> str:
    if type(ref) is not str:
        from qimem.services.key_refs import check_ref

        return check_ref(ref)
    return ref


def sign(
    app: AppContext,
    ref: str,
    message: bytes,
    *,
    realm: str = DEFAULT_REALM,
    prehashed: bool = False,
    marshaling: str = "asn1",
    raw: bool = False,
    actor: str | None = None,
) -> SignResult:
    """Sign ``message`` with the active version of the signing key ``ref``.

    :param ref: a key_id (must be active), lineage_id or name.
    :param prehashed: ``message`` is the digest (the algorithm's ``hash_name``) of the
        message; for ECDSA and RSA, not Ed25519 or ML-DSA.
    :param marshaling: ECDSA's signature encoding, ``asn1`` (DER) or ``jws`` (``r ‖ s``).
    :param raw: the algorithm's bare signature, without qimem's header.
    :raises ValidationError: ``wrong_purpose`` (not a signing key), bad options.
    :raises KeyNotActiveError: ``ref`` is a key_id that was rotated away.
    """
    entry = handles.for_signing(app, _ref(ref), realm, "sign", "signing")
    signature = entry.handle.sign(message, prehashed=prehashed, marshaling=marshaling)  # type: ignore[attr-defined]
    if not raw:
        signature = entry.prefix + signature
    if actor is not None:
        audit(app, realm, actor, "crypto.sign", entry.key_id, buffered=True, version=entry.version)
    return SignResult(signature, entry.key_id, entry.version, entry.algorithm_name)


def verify(
    app: AppContext,
    ref: str,
    message: bytes,
    signature: bytes,
    *,
    realm: str = DEFAULT_REALM,
    prehashed: bool = False,
    marshaling: str = "asn1",
    raw: bool = False,
    version: int | None = None,
    actor: str | None = None,
) -> VerifyResult:
    """Whether ``signature`` is a valid signature of ``message`` by the signing key ``ref``.

    A qimem signature names its key version, which must be a version of ``ref``'s lineage
    (of exactly that version, if ``ref`` is a key_id) that may still verify: it verifies
    after rotation. With ``raw``, ``signature`` is a bare signature, checked against
    ``version`` of the key (default: the version a key_id ``ref`` names, else the active
    one).

    :raises ValidationError: ``wrong_purpose``, bad options, ``version`` with a qimem
        signature (it names its own).
    :raises NotFoundError: no key ``ref`` (or no such ``version``).
    :raises ConflictError: the version the signature names (or ``version``) is disabled,
        destroyed or below the lineage's minimum version.
    """
    signature = _bytes(signature, "the signature")
    message = _bytes(message, "the message")
    ref = _ref(ref)
    if marshaling not in MARSHALINGS:  # refused even when no key version is found
        raise ValidationError(f"marshaling must be one of {', '.join(MARSHALINGS)}")
    if raw:
        entry: handles.CachedHandle | None = handles.version_entry(
            app, ref, realm, "sign", "signature verification", version
        )
        payload = signature
    else:
        if version is not None:
            raise ValidationError(
                "a qimem signature names its key version; give version= only with raw"
            )
        entry = handles.named(app, ref, signature, realm, "sign", "signature verification")
        payload = signature[_HEADER_SIZE:]
    if entry is None:
        valid = False
    else:
        valid = entry.verifier.verify(  # type: ignore[attr-defined]
            message, payload, prehashed=prehashed, marshaling=marshaling
        )
    if actor is not None:
        audit(
            app,
            realm,
            actor,
            "crypto.verify",
            entry.key_id if entry is not None else ref,
            buffered=True,
            valid=valid,
        )
    if not valid:
        return VerifyResult(False)
    return VerifyResult(True, entry.key_id, entry.version)  # type: ignore[union-attr]


def _public(entry: handles.CachedHandle) -> PublicKeyResult:
    algorithm: Any = entry.algorithm
    der = entry.public_key
    assert der is not None  # a signing entry always has its public key
    jwk = {**algorithm.public_jwk(der), "kid": entry.key_id}
    return PublicKeyResult(
        entry.key_id, entry.version, entry.algorithm_name, algorithm.public_pem(der), jwk
    )


def public_key(
    app: AppContext, ref: str, *, realm: str = DEFAULT_REALM, version: int | None = None
) -> PublicKeyResult:
    """The public key of a signing key version: ``version``, else the version a key_id
    ``ref`` names, else the active one. Never any private member.

    :raises ValidationError: ``wrong_purpose`` (MAC and encryption keys have no public key).
    :raises ConflictError: the version is disabled, destroyed or below the minimum version.
    """
    return _public(
        handles.version_entry(app, _ref(ref), realm, "sign", "a public key export", version)
    )


def public_keys(app: AppContext, ref: str, *, realm: str = DEFAULT_REALM) -> list[PublicKeyResult]:
    """The public keys of every version of ``ref``'s lineage that can still verify (not
    disabled or destroyed, not below the minimum version), oldest first: a JWKS's keys."""
    from qimem.errors import ConflictError
    from qimem.services.key_refs import resolve

    lineage_id, _ = resolve(app, _ref(ref), realm)
    versions = app.store.versions(realm, lineage_id)
    require_purpose(app, versions[-1], "sign", "a public key export")
    found = []
    for item in versions:
        try:
            found.append(
                _public(
                    handles.version_entry(
                        app, lineage_id, realm, "sign", "a public key export", item.version
                    )
                )
            )
        except ConflictError as exc:
            if exc.code == "key_pending_deletion":
                raise
    return found
