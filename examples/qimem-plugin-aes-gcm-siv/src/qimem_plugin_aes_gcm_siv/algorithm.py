"""AES-256-GCM-SIV (RFC 8452) over cryptography's ``AESGCMSIV``.

GCM-SIV is nonce-misuse resistant: if a random 96-bit nonce ever repeats under one key, an
attacker learns only whether the two messages were equal, instead of the authentication key
(as with plain GCM). It needs OpenSSL 3.2 or newer underneath cryptography.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from qimem.errors import DecryptionError, ValidationError

_BYTES = (bytes, bytearray, memoryview)


class AesGcmSiv:
    """The ``aes-256-gcm-siv`` algorithm: 32-byte keys, 12-byte nonces, 16-byte tags."""

    name = "aes-256-gcm-siv"
    #: Written into every envelope: never change it. 1 and 2 are qimem's built-ins; 3-255
    #: are for plugins, and qimem refuses to load two plugins claiming the same id.
    algorithm_id = 210
    key_size = 32
    nonce_size = 12
    tag_size = 16

    def generate_key(self) -> bytearray:
        """A fresh random 256-bit key."""
        return bytearray(os.urandom(self.key_size))

    def cipher(self, key: bytes | bytearray) -> AESGCMSIV:
        """A key-bound AEAD object (``encrypt(nonce, data, aad)`` / ``decrypt(...)``)."""
        if not isinstance(key, _BYTES) or len(key) != self.key_size:
            raise ValidationError(f"{self.name} needs a {self.key_size}-byte key")
        return AESGCMSIV(bytes(key))

    def _check(self, nonce: bytes, data: bytes, aad: bytes | None) -> None:
        if not isinstance(nonce, _BYTES) or len(nonce) != self.nonce_size:
            raise ValidationError(f"{self.name} needs a {self.nonce_size}-byte nonce")
        if not isinstance(data, _BYTES):
            raise ValidationError(f"{self.name}: data must be bytes")
        if aad is not None and not isinstance(aad, _BYTES):
            raise ValidationError(f"{self.name}: associated data must be bytes or None")

    def encrypt(
        self, key: bytes | bytearray, nonce: bytes, plaintext: bytes, aad: bytes | None = None
    ) -> bytes:
        """``ciphertext || tag``."""
        self._check(nonce, plaintext, aad)
        return self.cipher(key).encrypt(nonce, plaintext, aad)

    def decrypt(
        self, key: bytes | bytearray, nonce: bytes, ciphertext: bytes, aad: bytes | None = None
    ) -> bytes:
        """The plaintext; any failure is one vague :class:`DecryptionError`."""
        self._check(nonce, ciphertext, aad)
        try:
            return self.cipher(key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def __repr__(self) -> str:
        return f"<AesGcmSiv {self.name}>"
