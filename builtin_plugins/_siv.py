"""The built-in deterministic AEAD: AES-256-SIV (RFC 5297) over cryptography's ``AESSIV``.

:mod:`qimem.builtin_plugins.key_purposes` registers it by reference: this module is imported when
it is first used. Deterministic by design: the same key, plaintext and associated data
always give the same output, which therefore reveals when two plaintexts are equal.
"""

from __future__ import annotations

from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from qimem.crypto import random_bytes
from qimem.errors import DecryptionError, ValidationError

_BYTES = (bytes, bytearray, memoryview)


class AesSiv:
    """An :class:`qimem.crypto_purposes.DeterministicAlgorithm`: AES-256-SIV (AES-CMAC-SIV),
    64-byte keys (two AES-256 keys), output = 16-byte synthetic IV ‖ ciphertext.

    The associated data is always one S2V component: ``None`` and ``b""`` are the same
    (so callers cannot get two different "no AAD" ciphertexts for one plaintext).
    """

    name: ClassVar[str] = "aes-256-siv"
    algorithm_id: ClassVar[int] = 48
    purpose: ClassVar[str] = "deterministic"
    key_size: ClassVar[int] = 64
    tag_size: ClassVar[int] = 16

    def generate_key(self) -> bytearray:
        return bytearray(random_bytes(self.key_size))

    def _prepare(self, key: object, data: object, aad: object) -> tuple[AESSIV, list[bytes]]:
        if not isinstance(key, _BYTES) or len(key) != self.key_size:
            raise ValidationError(f"{self.name} needs a {self.key_size}-byte key")
        if not isinstance(data, _BYTES):
            raise ValidationError(f"{self.name}: data must be bytes")
        if aad is not None and not isinstance(aad, _BYTES):
            raise ValidationError(f"{self.name}: associated data must be bytes or None")
        return AESSIV(bytes(key)), [bytes(aad or b"")]

    def encrypt(self, key: bytes | bytearray, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Synthetic IV ‖ ciphertext; equal inputs give equal outputs."""
        siv, associated = self._prepare(key, plaintext, aad)
        return siv.encrypt(bytes(plaintext), associated)

    def decrypt(self, key: bytes | bytearray, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """The plaintext; :class:`DecryptionError` on any failure."""
        siv, associated = self._prepare(key, ciphertext, aad)
        if len(ciphertext) < self.tag_size:
            raise DecryptionError("ciphertext failed authentication")
        try:
            return siv.decrypt(bytes(ciphertext), associated)
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"
