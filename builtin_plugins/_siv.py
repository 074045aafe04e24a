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

    #: AES-SIV has no nonce to repeat: two messages share a keystream only when their
    #: synthetic IVs (126 effective bits) collide, about q^2 / 2^127 for q messages. qimem
    #: keeps the bound it applies to AEADs, 2^32 messages per key (a collision chance of
    #: ~2^-63; the CTR birthday term for 1 KiB messages, ~2^-52), declared here with its
    #: own reason so that usage-limit errors do not talk about nonces.
    max_messages_per_key: ClassVar[int] = 2**32
    max_messages_reason: ClassVar[str] = (
        "AES-SIV uses no nonce; qimem bounds a key at 2^32 messages, where its 126-bit "
        "synthetic IVs collide with probability about 2^-63"
    )

    def generate_key(self) -> bytearray:
        return bytearray(random_bytes(self.key_size))

    def _check_key(self, key: object) -> None:
        if not isinstance(key, _BYTES) or len(key) != self.key_size:
            raise ValidationError(f"{self.name} needs a {self.key_size}-byte key")

    def _prepare(self, key: object, data: object, aad: object) -> tuple[AESSIV, list[bytes]]:
        self._check_key(key)
        if not isinstance(data, _BYTES):
            raise ValidationError(f"{self.name}: data must be bytes")
        if aad is not None and not isinstance(aad, _BYTES):
            raise ValidationError(f"{self.name}: associated data must be bytes or None")
        return AESSIV(key), [bytes(aad or b"")]  # type: ignore[arg-type]

    def cipher(self, key: bytes | bytearray) -> SivCipher:
        """``key`` loaded once (the optional prepared form of
        :class:`qimem.crypto_purposes.DeterministicAlgorithm`): the service's cache entry
        holds this, not the key bytes. ``key`` may be zeroed afterwards (AESSIV copies it).
        """
        self._check_key(key)
        return SivCipher(AESSIV(key), self.tag_size)  # type: ignore[arg-type]

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


class SivCipher:
    """One AES-SIV key, loaded (what :meth:`AesSiv.cipher` returns). The callers, the
    service's envelope paths, pass bytes; the checks of the one-shot methods are theirs.
    Its repr shows no key."""

    __slots__ = ("_siv", "_tag_size")

    def __init__(self, siv: AESSIV, tag_size: int) -> None:
        self._siv = siv
        self._tag_size = tag_size

    def encrypt(self, plaintext: bytes, aad: bytes | None = None) -> bytes:
        """Synthetic IV ‖ ciphertext; equal inputs give equal outputs."""
        return self._siv.encrypt(plaintext, [aad or b""])

    def decrypt(self, ciphertext: bytes, aad: bytes | None = None) -> bytes:
        """The plaintext; :class:`DecryptionError` on any failure."""
        try:
            return self._siv.decrypt(ciphertext, [aad or b""])
        except InvalidTag:
            raise DecryptionError("ciphertext failed authentication") from None

    def __repr__(self) -> str:
        return "<SivCipher aes-256-siv>"
