"""The built-in MAC algorithms: HMAC over cryptography's ``hmac.HMAC``.

:mod:`qimem.builtin_plugins.key_purposes` registers these classes by reference: this module is
imported when a MAC algorithm is first used. Verification is constant-time: a full-length
tag through cryptography's ``HMAC.verify``, a truncated one (only when the caller names its
length, never below ``min_tag_size``) through ``constant_time.bytes_eq``.
"""

from __future__ import annotations

from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import constant_time, hashes
from cryptography.hazmat.primitives.hmac import HMAC

from qimem.crypto import random_bytes
from qimem.errors import ValidationError

_BYTES = (bytes, bytearray, memoryview)


class Hmac:
    """An :class:`qimem.crypto_purposes.MacAlgorithm`: HMAC with one SHA-2 hash."""

    name: ClassVar[str]
    algorithm_id: ClassVar[int]
    purpose: ClassVar[str] = "mac"
    hash_class: ClassVar[type[hashes.HashAlgorithm]]
    #: Key size = the hash's output size (RFC 2104 §3: longer adds no strength).
    key_size: ClassVar[int]
    tag_size: ClassVar[int]
    #: The shortest truncated tag ``verify(..., tag_size=)`` accepts: 16 bytes (128 bits).
    min_tag_size: ClassVar[int] = 16

    def generate_key(self) -> bytearray:
        return bytearray(random_bytes(self.key_size))

    def _hmac(self, key: object, data: object) -> HMAC:
        if not isinstance(key, _BYTES) or len(key) != self.key_size:
            raise ValidationError(f"{self.name} needs a {self.key_size}-byte key")
        if not isinstance(data, _BYTES):
            raise ValidationError(f"{self.name}: data must be bytes")
        h = HMAC(bytes(key), self.hash_class())
        h.update(data)
        return h

    def mac(self, key: bytes | bytearray, data: bytes) -> bytes:
        """The full ``tag_size``-byte tag of ``data``."""
        return self._hmac(key, data).finalize()

    def verify(
        self, key: bytes | bytearray, data: bytes, tag: bytes, *, tag_size: int | None = None
    ) -> bool:
        """Whether ``tag`` is ``data``'s tag, compared in constant time.

        :param tag_size: accept a tag truncated to this many bytes (``min_tag_size`` to
            ``tag_size``); without it only a full-length tag can verify.
        """
        if (  # the common case, checked in a few exact type tests (the service's hot path)
            tag_size is None
            and type(key) is bytes
            and type(data) is bytes
            and type(tag) is bytes
            and len(key) == self.key_size
        ):
            if len(tag) != self.tag_size:
                return False
            h = HMAC(key, self.hash_class())
            h.update(data)
            try:
                h.verify(tag)
            except InvalidSignature:
                return False
            return True
        h = self._hmac(key, data)
        if not isinstance(tag, _BYTES):
            raise ValidationError(f"{self.name}: the tag must be bytes")
        wanted = self.tag_size if tag_size is None else tag_size
        if type(wanted) is not int or not self.min_tag_size <= wanted <= self.tag_size:
            raise ValidationError(
                f"{self.name}: a truncated tag has {self.min_tag_size} to {self.tag_size} bytes"
            )
        if len(tag) != wanted:
            return False
        if wanted == self.tag_size:
            try:
                h.verify(bytes(tag))
            except InvalidSignature:
                return False
            return True
        return constant_time.bytes_eq(h.finalize()[:wanted], bytes(tag))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class HmacSha256(Hmac):
    """HMAC-SHA-256: 32-byte keys and tags."""

    name = "hmac-sha256"
    algorithm_id = 32
    hash_class = hashes.SHA256
    key_size = 32
    tag_size = 32


class HmacSha512(Hmac):
    """HMAC-SHA-512: 64-byte keys and tags."""

    name = "hmac-sha512"
    algorithm_id = 33
    hash_class = hashes.SHA512
    key_size = 64
    tag_size = 64
