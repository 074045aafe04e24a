"""A short-lived in-process cache of prepared ciphers for key versions.

Unwrapping a key costs a store round trip; encrypting 1 KiB costs microseconds. Entries
live ``ttl`` seconds. A rotation through this process drops the lineage's entries at once,
so this process never encrypts with a version it rotated away; a rotation by another
process is seen within ``ttl`` seconds (``cache.ttl_seconds``, 0 disables the cache).
Entries hold the algorithm's prepared cipher, never raw key bytes: the unwrapped material
is zeroed as soon as the cipher is built.

Decryption looks entries up by the envelope's header prefix (magic .. nonce length, see
:mod:`qimem.envelope`), which is constant for a key version and names it exactly: one
slice and one dict lookup per message, no parsing first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qimem.crypto import Cipher
from qimem.keys import KeyVersion


@dataclass(slots=True, repr=False)
class CachedKey:
    """A key version ready to use: metadata, prepared cipher, constant header prefix.

    ``header_size`` is the size of the whole envelope header (prefix, nonce, length field);
    ``pack_header`` builds one and ``unpack_header`` reads ``(nonce, ciphertext length)``
    from an envelope with this prefix (see :mod:`qimem.envelope`); ``key_id``, ``version``
    and ``realm`` repeat ``meta``'s for the hot path.
    """

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

    def __repr__(self) -> str:
        return f"<CachedKey {self.key_id} v{self.version}>"


class KeyCache:
    """Realm-scoped cache for encryption (by the caller's ref) and decryption (by header
    prefix)."""

    def __init__(self, ttl: float, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # The tables: realm -> ref -> entry (nested: a (realm, ref) tuple key costs more to
        # build and hash than a second lookup) and prefix -> entry (the prefix holds the key
        # id). Writes take the lock and change the dicts in place; reads are plain dict
        # lookups, and the service layer's hot path does them itself (a method call costs
        # about a tenth of an AES-GCM call at 1 KiB). An entry counts only while
        # ``entry.expires > time.monotonic()``, and a by_prefix entry only for its own realm
        # (``entry.realm``), exactly as for_encrypt / for_decrypt check.
        self.by_ref: dict[str, dict[str, CachedKey]] = {}
        self.by_prefix: dict[bytes, CachedKey] = {}
        self._lock = threading.Lock()
        # Bumped by every invalidation: an entry loaded from the store before a rotation
        # committed must not be cached after that rotation's invalidation (see put).
        self.generation = 0

    def for_encrypt(self, realm: str, ref: str) -> CachedKey | None:
        """The unexpired entry cached for ``ref`` (a key_id, lineage_id or name), if any."""
        entry = self.by_ref.get(realm, {}).get(ref)
        if entry is not None and entry.expires > time.monotonic():
            return entry
        return None

    def for_decrypt(self, realm: str, prefix: bytes) -> CachedKey | None:
        """The unexpired entry whose envelope header prefix is ``prefix``, if any."""
        entry = self.by_prefix.get(prefix)
        if entry is not None and entry.realm == realm and entry.expires > time.monotonic():
            return entry
        return None

    def expiry(self) -> float:
        return time.monotonic() + self.ttl

    def put(self, realm: str, entry: CachedKey, ref: str | None = None, *, generation: int) -> None:
        """Cache ``entry`` for decryption, and for encryption by ``ref`` if given.

        ``generation`` is :attr:`generation` read before the entry's metadata was read from
        the store; if an invalidation happened since, the entry may be stale and is dropped.
        """
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            size = len(self.by_prefix) + sum(len(refs) for refs in self.by_ref.values())
            if size >= self.max_entries:
                self._drop_all()
            self.by_prefix[entry.prefix] = entry
            if ref is not None:
                self.by_ref.setdefault(realm, {})[ref] = entry

    def invalidate_lineage(self, lineage_id: str) -> None:
        """Drop every entry of a lineage (after a rotation or state change)."""
        with self._lock:
            self.generation += 1
            for table in (*self.by_ref.values(), self.by_prefix):
                for k in [k for k, v in table.items() if v.meta.lineage_id == lineage_id]:
                    del table[k]

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._drop_all()

    def _drop_all(self) -> None:
        # In place, so a reader holding an inner dict sees the entries go too.
        for refs in self.by_ref.values():
            refs.clear()
        self.by_prefix.clear()
