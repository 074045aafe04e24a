"""Transit ciphertexts: ``vault:v<N>:`` + standard base64 of a qimem envelope.

``N`` is the key version that sealed the envelope; unlike Vault's, the prefix is checked
against the envelope's authenticated header (a mismatch is refused), and the envelope's
key must belong to the key named in the URL. ``v0`` (which Vault reads as v1) is refused:
qimem never wrote it.
"""

from __future__ import annotations

import base64
import binascii
import re

from qimem import envelope as env
from qimem.errors import QimemError
from qimem.server.transit.framework import VaultError

PREFIX = "vault:v"
#: A version is 1 to 10 digits (qimem's versions are 32-bit).
_FORMAT = re.compile(r"vault:v([1-9][0-9]{0,9}):([A-Za-z0-9+/]*={0,2})\Z")


def format_ciphertext(version: int, blob: bytes) -> str:
    """``vault:v<version>:<base64(blob)>``."""
    return f"{PREFIX}{version}:{base64.b64encode(blob).decode('ascii')}"


def parse_ciphertext(text: object, what: str = "ciphertext") -> tuple[int, bytes, env.Envelope]:
    """``(version, envelope bytes, parsed envelope)`` of a Transit ciphertext.

    :raises VaultError: (400) not ``vault:v<N>:<base64>``, not an envelope, or ``N`` is not
        the envelope's key version.
    """
    if not isinstance(text, str) or not text:
        raise VaultError(f"missing {what} to decrypt" if text is None else f"invalid {what}")
    if not text.startswith(PREFIX):
        raise VaultError(f"invalid {what}: no prefix")
    found = _FORMAT.match(text)
    if found is None:
        raise VaultError(f"invalid {what}: wrong version prefix or base64")
    version = int(found.group(1))
    try:
        blob = base64.b64decode(found.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise VaultError(f"invalid {what}: bad base64") from None
    try:
        parsed = env.parse(blob)
    except QimemError:
        raise VaultError(f"invalid {what}: not a qimem envelope") from None
    if parsed.key_version != version:
        raise VaultError(f"invalid {what}: the version prefix does not match the key version")
    return version, blob, parsed
