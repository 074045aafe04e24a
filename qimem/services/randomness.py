"""Random bytes and digests (Vault Transit's ``random`` and ``hash``, AWS KMS's
``GenerateRandom``): no key is involved, so nothing here touches the store.

Random bytes come from the operating system's CSPRNG (:func:`os.urandom`, the source
:mod:`secrets` uses), 1 byte to 1 MiB per request. Digests are SHA-2 and SHA-3 from
:mod:`hashlib`; the names are qimem's (``sha2-256``, ``sha3-512`` ...), one per digest.
"""

from __future__ import annotations

import hashlib
import os

from qimem.app import AppContext
from qimem.errors import ValidationError
from qimem.keys import DEFAULT_REALM

#: The most random bytes one request returns (1 MiB): enough for any key, token or seed,
#: small enough for one response (base64 over HTTP: 1.4 MB).
MAX_RANDOM_BYTES = 1 << 20

#: The digest names :func:`digest` accepts, and the hashlib constructor of each.
_HASHES = {
    "sha2-224": hashlib.sha224,
    "sha2-256": hashlib.sha256,
    "sha2-384": hashlib.sha384,
    "sha2-512": hashlib.sha512,
    "sha3-224": hashlib.sha3_224,
    "sha3-256": hashlib.sha3_256,
    "sha3-384": hashlib.sha3_384,
    "sha3-512": hashlib.sha3_512,
}
HASH_ALGORITHMS = tuple(_HASHES)
DEFAULT_HASH = "sha2-256"


def check_size(n: object) -> int:
    """``n`` as a byte count of a random request: an integer from 1 to
    :data:`MAX_RANDOM_BYTES`.

    :raises ValidationError: ``invalid_size``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RANDOM_BYTES:
        shown = repr(n) if isinstance(n, int) else type(n).__name__
        raise ValidationError(
            f"the number of random bytes must be an integer from 1 to {MAX_RANDOM_BYTES} "
            f"(1 MiB), not {shown[:40]}",
            code="invalid_size",
        )
    return n


def generate(n: int) -> bytes:
    """``n`` random bytes from the operating system's CSPRNG (no app, no audit: the CLI's
    ``qimem random``).

    :raises ValidationError: ``invalid_size``: ``n`` is not 1 to 1 MiB.
    """
    return os.urandom(check_size(n))


def random_bytes(app: AppContext, n: int, *, actor: str | None = None) -> bytes:
    """``n`` random bytes from the operating system's CSPRNG.

    ``actor``: who asked, for the audit log (``crypto.random`` with the size, never the
    bytes); the HTTP server audits in its middleware and passes none.

    :raises ValidationError: ``invalid_size``: ``n`` is not an integer from 1 to 1 MiB.
    """
    data = generate(n)
    if actor is not None:
        from qimem.services.lifecycle_common import audit

        audit(app, DEFAULT_REALM, actor, "crypto.random", "-", bytes=n)
    return data


def check_algorithm(algorithm: object) -> str:
    """``algorithm`` if it is one of :data:`HASH_ALGORITHMS`.

    :raises ValidationError: ``unsupported_hash``: it is not (the message lists them).
    """
    if not isinstance(algorithm, str) or algorithm not in _HASHES:
        shown = repr(algorithm)[:40] if isinstance(algorithm, str) else type(algorithm).__name__
        raise ValidationError(
            f"unknown hash algorithm {shown} (available: {', '.join(HASH_ALGORITHMS)})",
            code="unsupported_hash",
        )
    return algorithm


def hasher(algorithm: str = DEFAULT_HASH) -> hashlib._Hash:
    """A fresh incremental hash object of ``algorithm`` (``update()``, ``digest()``), for
    inputs read in chunks.

    :raises ValidationError: ``unsupported_hash``.
    """
    return _HASHES[check_algorithm(algorithm)]()


def digest(data: bytes, algorithm: str = DEFAULT_HASH) -> bytes:
    """The digest of ``data`` under ``algorithm`` (one of :data:`HASH_ALGORITHMS`).

    :raises ValidationError: ``unsupported_hash``: an unknown algorithm;
        ``invalid_request``: ``data`` is not bytes.
    """
    make = _HASHES[check_algorithm(algorithm)]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationError("the data to hash must be bytes")
    return make(data).digest()
