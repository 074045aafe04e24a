"""The built-in AEAD algorithms over cryptography's hazmat AEAD classes.

The plugin modules (:mod:`qimem.builtin_plugins.aes_gcm`, :mod:`~.chacha20`) register these
classes by reference (``"qimem.builtin_plugins._aead:AesGcm"``): this module, and
cryptography with it, is imported when an algorithm is first used.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from qimem.crypto import Cipher, random_bytes
from qimem.errors import DecryptionError, ValidationError

_BYTES = (bytes, bytearray, memoryview)


class CryptographyAead:
    """An :class:`qimem.crypto.Algorithm` over one of cryptography's AEAD classes."""

    name: ClassVar[str]
    algorithm_id: ClassVar[int]
    key_size: ClassVar[int] = 32
    nonce_size: ClassVar[int] = 12
    tag_size: ClassVar[int] = 16
    aead_class: ClassVar[Any]

    def generate_key(self) -> bytearray:
        return bytearray(random_bytes(self.key_size))

    def cipher(self, key: bytes | bytearray) -> Cipher:
        if not isinstance(key, _BYTES) or len(key) != self.key_size:
            raise ValidationError(f"{self.name} needs a {self.key_size}-byte key")
        return self.aead_class(bytes(key))  # type: ignore[no-any-return]

    def _check_inputs(self, nonce: bytes, data: bytes, aad: bytes | None) -> None:
        if not isinstance(nonce, _BYTES) or len(nonce) != self.nonce_size:
            raise ValidationError(f"{self.name} needs a {self.nonce_size}-byte nonce")
        if not isinstance(data, _BYTES):
            raise ValidationError(f"{self.name}: data must be bytes")
        if aad is not None and not isinstance(aad, _BYTES):
            raise ValidationError(f"{self.name}: associated data must be bytes or None")

    def encrypt(
        self, key: bytes | bytearray, nonce: bytes, plaintext: bytes, aad: bytes | None = None
    ) -> bytes:
        self._check_inputs(nonce, plaintext, aad)
        return self.cipher(key).encrypt(nonce, plaintext, aad)

    def decrypt(
        self, key: bytes | bytearray, nonce: bytes, ciphertext: bytes, aad: bytes | None = None
    ) -> bytes:
        self._check_inputs(nonce, ciphertext, aad)
        try:
            return self.cipher(key).decrypt(nonce, ciphertext, aad)
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class AesGcm(CryptographyAead):
    """AES-256-GCM (cryptography's ``AESGCM``): 32-byte keys, random 96-bit nonces."""

    name = "aes-256-gcm"
    algorithm_id = 1
    aead_class = AESGCM


class ChaCha20(CryptographyAead):
    """ChaCha20-Poly1305 (cryptography's ``ChaCha20Poly1305``): 32-byte keys, 96-bit nonces."""

    name = "chacha20-poly1305"
    algorithm_id = 2
    aead_class = ChaCha20Poly1305
