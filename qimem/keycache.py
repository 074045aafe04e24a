"""A short-lived in-process cache of prepared ciphers for key versions.

Unwrapping a key costs a store round trip; encrypting 1 KiB costs microseconds. Entries
live ``ttl`` seconds. A rotation through this process drops the lineage's entries at once,
so this process never encrypts with a version it rotated away; a rotation by another
process is seen within ``ttl`` seconds (``cache.ttl_seconds``, 0 disables the cache).
Entries hold the algorithm's prepared cipher, never raw key bytes: the unwrapped material
is zeroed as soon as the cipher is built.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from qimem.crypto import Cipher
from qimem.keys import KeyVersion


@dataclass(slots=True, repr=False)
class CachedKey:
    """A key version ready to use: metadata, prepared cipher, constant header prefix."""

    meta: KeyVersion
    cipher: Cipher
    prefix: bytes
    algorithm_id: int
    nonce_size: int
    tag_size: int
    expires: float

    def __repr__(self) -> str:
        return f"<CachedKey {self.meta.key_id} v{self.meta.version}>"


class KeyCache:
    """Realm-scoped cache for encryption (by the caller's ref) and decryption (by key id)."""

    def __init__(self, ttl: float, max_entries: int = 4096) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._encrypt: dict[tuple[str, str], CachedKey] = {}
        self._decrypt: dict[tuple[str, bytes], CachedKey] = {}
        self._lock = threading.Lock()

    def for_encrypt(self, realm: str, ref: str) -> CachedKey | None:
        entry = self._encrypt.get((realm, ref))
        if entry is not None and entry.expires > time.monotonic():
            return entry
        return None

    def for_decrypt(self, realm: str, key_id: bytes) -> CachedKey | None:
        entry = self._decrypt.get((realm, key_id))
        if entry is not None and entry.expires > time.monotonic():
            return entry
        return None

    def expiry(self) -> float:
        return time.monotonic() + self.ttl

    def put(self, realm: str, key_id: bytes, entry: CachedKey, ref: str | None = None) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if len(self._decrypt) + len(self._encrypt) >= self.max_entries:
                self._encrypt.clear()
                self._decrypt.clear()
            self._decrypt[(realm, key_id)] = entry
            if ref is not None:
                self._encrypt[(realm, ref)] = entry

    def invalidate_lineage(self, lineage_id: str) -> None:
        """Drop every entry of a lineage (after a rotation or state change)."""
        with self._lock:
            for table in (self._encrypt, self._decrypt):
                for k in [k for k, v in table.items() if v.meta.lineage_id == lineage_id]:
                    del table[k]

    def clear(self) -> None:
        with self._lock:
            self._encrypt.clear()
            self._decrypt.clear()
