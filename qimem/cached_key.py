"""The key cache's entry for an encryption key version: :class:`CachedKey` (see
:mod:`qimem.keycache`, which holds these and re-exports the class).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from qimem.crypto import Cipher
from qimem.keys import KeyVersion


class CachedKey:
    """A key version ready to use: metadata, prepared cipher, constant header prefix.

    ``header_size`` is the size of the whole envelope header (prefix, nonce, length field);
    ``pack_header`` builds one and ``unpack_header`` reads ``(nonce, ciphertext length)``
    from an envelope with this prefix (see :mod:`qimem.envelope`); ``key_id``, ``version``
    and ``realm`` repeat ``meta``'s for the hot path.

    Lifecycle (qimem.services.lifecycle): ``hard_expires`` is the TTL expiry (``expires`` is
    also cut short at the next marker check) and ``limit`` the version's usage limit. Usage
    counting and nonces go together: ``nonces`` yields fresh random nonces (os.urandom,
    drawn 256 at a time), one per usage count already reserved in the store, so an
    encryption takes both with one ``next(nonces, None)`` (thread-safe: a list iterator;
    None: reserve more). ``reserved``: counts reserved for this entry in all; ``unissued``:
    reserved counts not yet turned into nonces.

    A plain ``__slots__`` class rather than a dataclass: creating a dataclass costs ~0.5 ms
    at import, on every CLI encryption (issue 13). Equality compares every field, like the
    dataclass did; instances are unhashable.
    """

    __slots__ = (
        "meta",
        "cipher",
        "prefix",
        "algorithm_id",
        "nonce_size",
        "tag_size",
        "header_size",
        "pack_header",
        "unpack_header",
        "key_id",
        "version",
        "realm",
        "expires",
        "hard_expires",
        "limit",
        "reserved",
        "unissued",
        "nonces",
        "lock",
    )

    meta: KeyVersion
    cipher: Cipher
    prefix: bytes
    algorithm_id: int
    nonce_size: int
    tag_size: int
    header_size: int
    pack_header: Callable[[bytes, bytes, int], bytes]
    unpack_header: Callable[[bytes], tuple[bytes, int]]
    key_id: str
    version: int
    realm: str
    expires: float
    hard_expires: float
    limit: int
    reserved: int
    unissued: int
    nonces: Iterator[bytes]
    lock: threading.Lock

    def __init__(
        self,
        meta: KeyVersion,
        cipher: Cipher,
        prefix: bytes,
        algorithm_id: int,
        nonce_size: int,
        tag_size: int,
        header_size: int,
        pack_header: Callable[[bytes, bytes, int], bytes],
        unpack_header: Callable[[bytes], tuple[bytes, int]],
        key_id: str,
        version: int,
        realm: str,
        expires: float,
        hard_expires: float = 0.0,
        limit: int = 0,
        reserved: int = 0,
        unissued: int = 0,
        nonces: Iterator[bytes] | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.meta = meta
        self.cipher = cipher
        self.prefix = prefix
        self.algorithm_id = algorithm_id
        self.nonce_size = nonce_size
        self.tag_size = tag_size
        self.header_size = header_size
        self.pack_header = pack_header
        self.unpack_header = unpack_header
        self.key_id = key_id
        self.version = version
        self.realm = realm
        self.expires = expires
        self.hard_expires = hard_expires
        self.limit = limit
        self.reserved = reserved
        self.unissued = unissued
        self.nonces = iter(()) if nonces is None else nonces
        self.lock = threading.Lock() if lock is None else lock

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, CachedKey)
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<CachedKey {self.key_id} v{self.version}>"
