"""Envelope v1: one AEAD message with everything needed to decrypt it (docs/formats.md).

Layout (all integers big-endian)::

    offset  size  field
    0       4     magic  b"QMEV"
    4       1     format version (1)
    5       1     algorithm id (1 = aes-256-gcm, 2 = chacha20-poly1305, plugins: others)
    6       16    key id (the key version's UUID, 16 raw bytes)
    22      4     key version (uint32, >= 1)
    26      1     nonce length N (must be the algorithm's nonce size)
    27      N     nonce
    27+N    4     ciphertext length L (ciphertext ‖ tag, uint32)
    31+N    L     ciphertext ‖ tag

The header is bytes ``[0, 31+N)``. The AEAD's associated data is ``header ‖ caller_aad``, so
changing the algorithm, key id, version, nonce or length is detected. The encoding is
deterministic: a value has exactly one encoding, and the parser rejects anything else.

A *deterministic* envelope (a key of purpose ``deterministic``, e.g. AES-256-SIV) has the
same layout with N = 0: no nonce, and the L bytes are the algorithm's output (synthetic IV
‖ ciphertext), computed over the same associated data ``header ‖ caller_aad``. The same
key version, plaintext and caller aad therefore always give the same envelope
(:func:`seal_deterministic`). The parser accepts N = 0 for any algorithm id; decryption
then requires the stored key's algorithm to be one without a nonce.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import NamedTuple

from qimem.errors import EnvelopeFormatError

MAGIC = b"QMEV"
VERSION = 1
PREFIX_SIZE = 27  # magic .. nonce length
_PREFIX = struct.Struct(">4sBB16sIB")
LENGTH = struct.Struct(">I")  # the ciphertext length field after the nonce
MAX_VERSION = 0xFFFFFFFF


class Envelope(NamedTuple):
    """A parsed envelope. ``header`` is the exact bytes bound as associated data."""

    algorithm_id: int
    key_id: bytes
    key_version: int
    nonce: bytes
    ciphertext: bytes
    header: bytes

    @property
    def key_id_str(self) -> str:
        return str(uuid.UUID(bytes=self.key_id))


def header_prefix(
    algorithm_id: int, key_id: str | bytes, key_version: int, nonce_size: int
) -> bytes:
    """Header bytes up to the nonce; constant for one key version."""
    raw_id = key_id if isinstance(key_id, bytes) else uuid.UUID(key_id).bytes
    if len(raw_id) != 16:  # struct's "16s" would silently pad or cut it
        raise ValueError("a key id is 16 bytes")
    if isinstance(key_version, bool) or not isinstance(key_version, int):
        raise ValueError("key version must be an integer")
    if not 1 <= key_version <= MAX_VERSION:
        raise ValueError("key version out of range")
    if not 0 <= nonce_size <= 0xFF:  # 0: a deterministic envelope (no nonce)
        raise ValueError("nonce size out of range")
    return _PREFIX.pack(MAGIC, VERSION, algorithm_id, raw_id, key_version, nonce_size)


def header_size(nonce_size: int) -> int:
    """Size of the whole header (prefix, nonce, length field) for a nonce size."""
    return PREFIX_SIZE + nonce_size + LENGTH.size


def header_packer(nonce_size: int) -> Callable[[bytes, bytes, int], bytes]:
    """``pack(prefix, nonce, ciphertext_length)``: :func:`header` in one call, for a nonce of
    exactly ``nonce_size`` bytes (the caller guarantees both sizes).

    For ``nonce_size`` 0 (a deterministic envelope) the ``nonce`` argument is ignored: the
    service layer passes a usage token there (one usage count reserved in the store, see
    :func:`qimem.services.lifecycle.reserve`), which the envelope does not carry."""
    if nonce_size == 0:
        pack_length = LENGTH.pack

        def pack_nonceless(prefix: bytes, _token: bytes, ciphertext_length: int) -> bytes:
            return prefix + pack_length(ciphertext_length)

        return pack_nonceless
    return struct.Struct(f">{PREFIX_SIZE}s{nonce_size}sI").pack


def header_unpacker(nonce_size: int) -> Callable[[bytes], tuple[bytes, int]]:
    """``unpack_from`` giving ``(nonce, ciphertext length)`` of a header whose nonce is
    ``nonce_size`` bytes; raises :class:`struct.error` when the bytes are shorter."""
    return struct.Struct(f">{PREFIX_SIZE}x{nonce_size}sI").unpack_from


def header(prefix: bytes, nonce: bytes, ciphertext_length: int) -> bytes:
    """The full header: ``prefix ‖ nonce ‖ uint32(ciphertext_length)``."""
    return prefix + nonce + LENGTH.pack(ciphertext_length)


def associated_data(header_bytes: bytes, aad: bytes | None) -> bytes:
    """What the AEAD authenticates besides the ciphertext: header ‖ caller aad."""
    return header_bytes + aad if aad else header_bytes


def parse(blob: bytes) -> Envelope:
    """Parse envelope bytes strictly. A nonce length of 0 (a deterministic envelope) gives
    an empty ``nonce``.

    :raises EnvelopeFormatError: bad magic, unknown format version, truncation, trailing
        bytes, or a zero key version.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise EnvelopeFormatError("envelope must be bytes")
    blob = bytes(blob)
    if len(blob) < PREFIX_SIZE:
        if blob[:4] != MAGIC[: len(blob[:4])]:
            raise EnvelopeFormatError("not a qimem envelope (bad magic)")
        raise EnvelopeFormatError("envelope is truncated")
    magic, version, algorithm_id, key_id, key_version, nonce_size = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise EnvelopeFormatError("not a qimem envelope (bad magic)")
    if version != VERSION:
        raise EnvelopeFormatError(f"unsupported envelope version {version}")
    if key_version == 0:
        raise EnvelopeFormatError("envelope has key version 0")
    body = PREFIX_SIZE + nonce_size + LENGTH.size
    if len(blob) < body:
        raise EnvelopeFormatError("envelope is truncated")
    (length,) = LENGTH.unpack_from(blob, PREFIX_SIZE + nonce_size)
    if len(blob) < body + length:
        raise EnvelopeFormatError("envelope is truncated")
    if len(blob) > body + length:
        raise EnvelopeFormatError("envelope has trailing bytes")
    return Envelope(
        algorithm_id=algorithm_id,
        key_id=key_id,
        key_version=key_version,
        nonce=blob[PREFIX_SIZE : PREFIX_SIZE + nonce_size],
        ciphertext=blob[body:],
        header=blob[:body],
    )


def seal(
    algorithm: object,
    key: bytes | bytearray,
    key_id: str,
    key_version: int,
    nonce: bytes,
    plaintext: bytes,
    aad: bytes | None = None,
) -> bytes:
    """Build one envelope with an explicit nonce (known-answer vectors, tests).

    ``algorithm`` is a :class:`qimem.crypto.Algorithm`; the service layer uses the same
    layout with a fresh random nonce per message.
    """
    if len(nonce) != algorithm.nonce_size:  # type: ignore[attr-defined]
        raise ValueError("the nonce does not have the algorithm's nonce size")
    prefix = header_prefix(algorithm.algorithm_id, key_id, key_version, algorithm.nonce_size)  # type: ignore[attr-defined]
    head = header(prefix, nonce, len(plaintext) + algorithm.tag_size)  # type: ignore[attr-defined]
    return head + algorithm.encrypt(key, nonce, plaintext, associated_data(head, aad))  # type: ignore[attr-defined]


def seal_deterministic(
    algorithm: object,
    key: bytes | bytearray,
    key_id: str,
    key_version: int,
    plaintext: bytes,
    aad: bytes | None = None,
) -> bytes:
    """Build one deterministic envelope (nonce length 0) with a
    :class:`qimem.crypto_purposes.DeterministicAlgorithm` (known-answer vectors, tests):
    the algorithm's output (synthetic IV ‖ ciphertext) over associated data
    ``header ‖ aad``. The service layer builds the same bytes."""
    prefix = header_prefix(algorithm.algorithm_id, key_id, key_version, 0)  # type: ignore[attr-defined]
    head = header(prefix, b"", len(plaintext) + algorithm.tag_size)  # type: ignore[attr-defined]
    return head + algorithm.encrypt(key, plaintext, associated_data(head, aad))  # type: ignore[attr-defined]
