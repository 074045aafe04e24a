"""What makes a deterministic key (purpose ``deterministic``, e.g. AES-256-SIV) fit the
envelope paths of :mod:`qimem.services.crypto` unchanged, and the purpose checks of those
paths (docs/deterministic.md, docs/formats.md "Deterministic envelopes").

A deterministic key's cache entry holds a :class:`DeterministicCipher` (an AEAD's call
shape, nonce ignored; over the plugin's prepared cipher when it offers ``cipher(key)``, so
no key bytes stay in the entry), builds a header with nonce length 0, and draws one-byte usage
tokens where an AEAD entry draws nonces, so usage counting, caches, states and policies
are those of AEAD keys.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from qimem.app import AppContext
from qimem.crypto import DEFAULT_PURPOSE
from qimem.errors import ValidationError
from qimem.keycache import CachedKey
from qimem.keys import KeyVersion
from qimem.services.lifecycle_common import key_purpose

#: The purposes whose keys seal envelopes (encrypt, decrypt, rewrap).
ENVELOPE_PURPOSES = (DEFAULT_PURPOSE, "deterministic")
#: A deterministic key's cache entry draws one-byte usage tokens in place of nonces
#: (:func:`qimem.services.lifecycle.reserve` slices its random pool by the entry's
#: ``nonce_size``; each token stands for one usage count reserved in the store); the
#: envelope carries none of them.
TOKEN_SIZE = 1


class DeterministicCipher:
    """A deterministic algorithm (:class:`qimem.crypto_purposes.DeterministicAlgorithm`)
    bound to one key, in the call shape of an AEAD cipher, so the envelope paths need no
    branch: ``encrypt(nonce, data, associated_data)`` ignores ``nonce`` (the envelope of
    such a key has none).

    When the plugin prepares a cipher (the optional ``cipher(key)``, as AES-SIV's does),
    this holds that object and no key bytes: ``key`` may be zeroed once it returns. A
    plugin without one gets the key on every call, so this then keeps a copy of the key
    bytes for the entry's life (:attr:`holds_key` is True). The repr shows no key.
    """

    __slots__ = ("_algorithm", "_encrypt", "_decrypt", "holds_key")

    def __init__(self, algorithm: Any, key: bytes | bytearray) -> None:
        self._algorithm = algorithm
        prepare = getattr(algorithm, "cipher", None)
        if callable(prepare):
            prepared = prepare(key)
            self._encrypt, self._decrypt = prepared.encrypt, prepared.decrypt
            self.holds_key = False
        else:  # plugin API 1.2 without the optional prepared form
            held = bytes(key)
            self._encrypt = partial(algorithm.encrypt, held)
            self._decrypt = partial(algorithm.decrypt, held)
            self.holds_key = True

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._encrypt(data, associated_data)  # type: ignore[no-any-return]

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._decrypt(data, associated_data)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<DeterministicCipher {getattr(self._algorithm, 'name', '?')}>"


def wrong_purpose(version: KeyVersion, purpose: str, needs: str) -> ValidationError:
    """The ``wrong_purpose`` error naming the key, its purpose and algorithm, and ``needs``."""
    label = version.name or version.lineage_id
    return ValidationError(
        f"key {label} is a {purpose} key ({version.algorithm}); {needs}",
        code="wrong_purpose",
    )


def require_envelope_purpose(app: AppContext, version: KeyVersion) -> None:
    """:raises ValidationError: ``wrong_purpose``: a signing or MAC key."""
    purpose = key_purpose(app, version)
    if purpose not in ENVELOPE_PURPOSES:
        raise wrong_purpose(version, purpose, "encryption needs an encrypt or deterministic key")


def require_data_key_purpose(key: CachedKey) -> None:
    """Data keys (and so files) take encrypt keys only: a data key is random, so a
    deterministic key would only give up the randomized envelope, and a file format that
    made equal files equal (convergent encryption) would let anyone holding a guess confirm
    it.

    :raises ValidationError: ``wrong_purpose``: ``key`` is a deterministic key's entry.
    """
    if isinstance(key.cipher, DeterministicCipher):
        raise _not_for_data_keys(key.meta, "deterministic")


def require_data_key_version(app: AppContext, version: KeyVersion) -> None:
    """:func:`require_data_key_purpose` of a version about to be loaded (a cache miss), so a
    refused request unwraps nothing.

    :raises ValidationError: ``wrong_purpose``: not an encrypt key.
    """
    purpose = key_purpose(app, version)
    if purpose != DEFAULT_PURPOSE:
        raise _not_for_data_keys(version, purpose)


def _not_for_data_keys(version: KeyVersion, purpose: str) -> ValidationError:
    return wrong_purpose(
        version,
        purpose,
        "data keys and files need an encrypt key (a deterministic key seals single "
        "values, such as column entries, with encrypt and decrypt)",
    )
