"""Derived keys (Vault's ``derived``): every encryption and decryption with such a key needs
a context, and uses a per-context subkey derived with HKDF-SHA256 (docs/keys.md)."""

from __future__ import annotations

from typing import Any

from qimem.errors import ValidationError
from qimem.keys import KeyVersion, LineagePolicy

MAX_CONTEXT = 4096
_DERIVE_INFO = b"qimem-derived-v1\x00"


def check_context(context: Any) -> bytes:
    """A derivation context: 1 to 4096 bytes.

    :raises ValidationError: ``invalid_context``.
    """
    if (
        not isinstance(context, bytes | bytearray | memoryview)
        or not 1 <= len(context) <= MAX_CONTEXT
    ):
        raise ValidationError(f"a context must be 1 to {MAX_CONTEXT} bytes", code="invalid_context")
    return bytes(context)


def derive_subkey(material: bytes | bytearray, context: bytes) -> bytes:
    """The per-context subkey of a derived key version: HKDF-SHA256 (RFC 5869) with the
    version's key as input keying material, no salt, and ``"qimem-derived-v1" 0x00
    context`` as info, as long as the key itself."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=len(material), salt=None, info=_DERIVE_INFO + context
    )
    return hkdf.derive(bytes(material))


def check_derived(version: KeyVersion, policy: LineagePolicy, context: bytes | None) -> None:
    """:raises ValidationError: ``context_required`` / ``context_not_allowed``."""
    label = f"key {version.name or version.lineage_id}"
    if policy.derived and context is None:
        raise ValidationError(
            f"{label} is a derived key: give the context (the same one to decrypt)",
            code="context_required",
        )
    if context is not None and not policy.derived:
        raise ValidationError(
            f"{label} is not a derived key; a context applies only to derived keys",
            code="context_not_allowed",
        )
