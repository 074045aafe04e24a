"""The algorithm interface that AEAD plugins implement, and helpers they share.

An algorithm is a small object with fixed sizes and four operations. ``cipher(key)``
returns a prepared object (e.g. cryptography's ``AESGCM``) so hot paths do not rebuild the
key schedule on every message. Plugins translate their library's exceptions into
:class:`qimem.errors.DecryptionError` / :class:`qimem.errors.ValidationError`.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable


@runtime_checkable
class Cipher(Protocol):
    """A key-bound AEAD, e.g. cryptography's ``AESGCM(key)``."""

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes: ...


@runtime_checkable
class Algorithm(Protocol):
    """An AEAD algorithm contributed by a plugin through ``qimem_register_algorithms``."""

    name: str
    algorithm_id: int
    key_size: int
    nonce_size: int
    tag_size: int

    def generate_key(self) -> bytearray:
        """Fresh random key material of ``key_size`` bytes."""
        ...

    def cipher(self, key: bytes | bytearray) -> Cipher:
        """A prepared AEAD bound to ``key``; its ``decrypt`` raises the library's own error."""
        ...

    def encrypt(
        self, key: bytes | bytearray, nonce: bytes, plaintext: bytes, aad: bytes | None = None
    ) -> bytes:
        """Seal ``plaintext``; returns ciphertext ‖ tag."""
        ...

    def decrypt(
        self, key: bytes | bytearray, nonce: bytes, ciphertext: bytes, aad: bytes | None = None
    ) -> bytes:
        """Open ciphertext ‖ tag; raises :class:`qimem.errors.DecryptionError` on any failure."""
        ...


#: Every key purpose (plugin API 1.2); the protocols of the others are in
#: :mod:`qimem.crypto_purposes`. Here, not there, so the registry reads them without
#: importing the protocols.
PURPOSES = ("encrypt", "sign", "mac", "deterministic")
#: The purpose of an algorithm that declares none (every plugin API 1.0/1.1 algorithm).
DEFAULT_PURPOSE = "encrypt"


def purpose_of(algorithm: object) -> str:
    """The purpose an algorithm object declares (``"encrypt"`` if it declares none)."""
    purpose = getattr(algorithm, "purpose", DEFAULT_PURPOSE)
    return purpose if isinstance(purpose, str) else repr(purpose)


def random_bytes(size: int) -> bytes:
    """Random bytes from the operating system's CSPRNG (nonces, ids)."""
    return os.urandom(size)


def zero(buffer: bytearray) -> None:
    """Overwrite ``buffer`` with zeros in place (best effort: Python may hold other copies)."""
    buffer[:] = bytes(len(buffer))
