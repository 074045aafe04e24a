"""A short-lived in-process cache of prepared ciphers for key versions.

Unwrapping a key costs a store round trip; encrypting 1 KiB costs microseconds. Entries
live ``ttl`` seconds. A rotation through this process drops the lineage's entries at once,
so this process never encrypts with a version it rotated away. Changes made by other
processes arrive in one of two ways (:mod:`qimem.invalidation`): pushed by the store's change
feed (PostgreSQL ``LISTEN/NOTIFY``), which drops exactly the changed lineage's entries, or,
without one or while it is disconnected, by polling the store's rotation marker at most every
``revalidate_seconds`` (a change drops every entry). ``cache.ttl_seconds`` bounds every
entry's life either way (0 disables the cache).
Entries hold the algorithm's prepared cipher, never raw key bytes (deterministic keys too,
when the plugin prepares one: ``DeterministicCipher.holds_key``): the unwrapped material
is zeroed as soon as the cipher is built.

Decryption looks entries up by the envelope's header prefix (magic .. nonce length, see
:mod:`qimem.envelope`), which is constant for a key version and names it exactly: one
slice and one dict lookup per message, no parsing first.

Keys of the other purposes (signing and MAC keys, issue 16) live in the same cache, in a
table of their own (:attr:`KeyCache.handles`, entries are
:class:`qimem.services.handles.CachedHandle`), so every invalidation above (rotation, state
and policy changes, the change feed, polling, TTL, a fork) drops them the same way; the
encrypt and decrypt hot paths never look there. A signing entry holds the loaded signer and
verifier; a MAC entry holds the key bytes, because the MAC plugin interface
(:class:`qimem.crypto_purposes.MacAlgorithm`) takes the key on every call.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from qimem.cached_key import CachedKey
from qimem.lazylog import get_logger

if TYPE_CHECKING:
    from qimem.services.handles import CachedHandle

__all__ = ["CachedKey", "KeyCache"]  # CachedKey lives in qimem.cached_key

log = get_logger(__name__)

_UNKNOWN = object()
_CACHES: weakref.WeakSet[KeyCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child starts with empty caches: entries hold nonces and reserved usage
    counts that belong to the parent (sharing them would reuse nonces and under-count)."""
    for cache in list(_CACHES):
        cache._lock = threading.Lock()
        cache._check_lock = threading.Lock()
        cache.generation += 1
        cache._drop_all()
        cache._retired = {}  # the parent's reservations: the parent gives them back
        cache._valid_until = 0.0
        cache.pushing = False  # the parent's change feed does not feed the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class KeyCache:
    """Realm-scoped cache for encryption (by the caller's ref) and decryption (by header
    prefix)."""

    def __init__(
        self, ttl: float, max_entries: int = 4096, *, revalidate_seconds: float = 0.1
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        # Across servers: entries count only until the next check of the store's
        # rotation_marker(), made at most every revalidate_seconds (see revalidate).
        self.revalidate_seconds = revalidate_seconds
        self._marker: object = _UNKNOWN
        self._valid_until = 0.0  # entries' ``expires`` never pass this without a check
        # A change feed is connected (see push_connected): no polling, entries live their
        # TTL, the feed's notices drop what changed.
        self.pushing = False
        # Entries dropped by invalidations, and invalidations (for tests and operators).
        self.dropped = 0
        self.invalidations = 0
        self._check_lock = threading.Lock()
        _CACHES.add(self)
        # The tables: realm -> ref -> entry (nested: a (realm, ref) tuple key costs more to
        # build and hash than a second lookup) and prefix -> entry (the prefix holds the key
        # id). Writes take the lock and change the dicts in place; reads are plain dict
        # lookups, and the service layer's hot path does them itself (a method call costs
        # about a tenth of an AES-GCM call at 1 KiB). An entry counts only while
        # ``entry.expires > time.monotonic()``, and a by_prefix entry only for its own realm
        # (``entry.realm``), exactly as for_encrypt / for_decrypt check.
        self.by_ref: dict[str, dict[str, CachedKey]] = {}
        self.by_prefix: dict[bytes, CachedKey] = {}
        # Derived keys' per-context entries, (realm, ref or prefix, context) -> entry; never
        # in the tables above, so the hot paths cannot use one without its context.
        self.derived: dict[tuple[str, object, bytes], CachedKey] = {}
        # Signing and MAC keys: realm -> {ref (str): the active version (signs with it
        # only if ``entry.signs``); or signature/tag prefix (bytes): a version, for
        # verifying} (see CachedHandle).
        self.handles: dict[str, dict[str | bytes, CachedHandle]] = {}
        self._lock = threading.Lock()
        # Entries dropped or replaced while still holding reserved, unused usage counts:
        # returned to the store by flush_retired() (on the next cache miss) and
        # take_unused() (when the app closes), so dropping an entry never leaves counts
        # reserved that nothing will use (docs/keys.md "Usage limits").
        self._retired: dict[int, CachedKey] = {}
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
            entry.hard_expires = entry.expires
            if entry.expires > self._valid_until:
                entry.expires = self._valid_until
            size = len(self.by_prefix) + sum(len(refs) for refs in self.by_ref.values())
            if size >= self.max_entries:
                self._drop_all()
            self._retire(self.by_prefix.get(entry.prefix), entry)
            self.by_prefix[entry.prefix] = entry
            if ref is not None:
                refs = self.by_ref.setdefault(realm, {})
                self._retire(refs.get(ref), entry)
                refs[ref] = entry

    def revalidate(self, marker: Callable[[], object]) -> None:
        """Check the store's rotation marker, at most every ``revalidate_seconds``.

        Called on cache misses (an entry's ``expires`` is cut to the next check, so the
        first use after that point misses and lands here). If the marker changed (a
        rotation, state or policy change committed anywhere), every entry is dropped; if
        not, entries are extended to the next check (never past their TTL). If the store
        cannot be reached, entries keep serving: no rotation can commit then either. A
        store whose marker is ``None`` cannot tell, and entries live their TTL.
        """
        if time.monotonic() < self._valid_until:
            return
        with self._check_lock:
            now = time.monotonic()
            if now < self._valid_until:
                return
            try:
                value = marker()
            except Exception:  # the store is unreachable: keep serving what is cached
                value = self._marker
            if value is None:
                self._valid_until = float("inf")
            elif value != self._marker:
                with self._lock:
                    self.generation += 1
                    self.invalidations += 1
                    self._drop_all()
                self._marker = value
            pushed = self.pushing or value is None
            until = float("inf") if pushed else now + self.revalidate_seconds
            with self._lock:
                for entry in self._entries():
                    entry.expires = min(entry.hard_expires, until)
            self._valid_until = until

    def push_connected(self, marker: object) -> None:
        """A change feed delivers every change committed from now on; ``marker`` is the
        store's rotation marker read after it subscribed. If it is not the last one this
        cache knows, a change was missed (while disconnected): every entry is dropped.
        Then entries live their TTL without polling."""
        with self._check_lock:
            if marker is None or marker != self._marker:
                with self._lock:
                    self.generation += 1
                    self.invalidations += 1
                    self._drop_all()
            self._marker = marker
            with self._lock:
                for entry in self._entries():
                    entry.expires = entry.hard_expires
            self.pushing = True
            self._valid_until = float("inf")

    def push_lost(self) -> None:
        """The change feed stopped delivering: poll again, starting at the next use (an
        unchanged marker keeps every entry)."""
        with self._check_lock:
            self.pushing = False
            self._expire_now()

    def recheck(self) -> None:
        """Compare the rotation marker at the next use (a notice that did not parse: if
        the marker is the last one known, nothing is dropped)."""
        with self._check_lock:
            self._expire_now()

    def _expire_now(self) -> None:
        self._valid_until = 0.0
        with self._lock:
            for entry in self._entries():
                entry.expires = 0.0

    def for_derived(self, slot: tuple[str, object, bytes]) -> CachedKey | None:
        """The unexpired per-context entry of a derived key, if any."""
        entry = self.derived.get(slot)
        if entry is not None and entry.expires > time.monotonic():
            return entry
        return None

    def put_derived(
        self, slot: tuple[str, object, bytes], entry: CachedKey, *, generation: int
    ) -> None:
        """Cache a derived key's per-context entry (see :meth:`put`)."""
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            if len(self.derived) >= self.max_entries:
                for old in self.derived.values():
                    self._retire(old)
                self.derived.clear()
            entry.hard_expires = entry.expires
            if entry.expires > self._valid_until:
                entry.expires = self._valid_until
            self._retire(self.derived.get(slot), entry)
            self.derived[slot] = entry

    def for_handle(self, realm: str, key: str | bytes) -> CachedHandle | None:
        """The unexpired signing/MAC entry cached under ``key`` (a ref or a prefix)."""
        entry = self.handles.get(realm, {}).get(key)
        if entry is not None and entry.expires > time.monotonic():
            return entry
        return None

    def put_handle(
        self, realm: str, entry: CachedHandle, ref: str | None = None, *, generation: int
    ) -> None:
        """Cache a signing/MAC entry under its prefix, and under ``ref`` if given (see
        :meth:`put` for ``generation``). Bounded by ``max_entries`` like the others."""
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            size = sum(len(table) for table in self.handles.values())
            if size + (1 if ref is None else 2) > self.max_entries:
                for table in self.handles.values():
                    table.clear()
            entry.hard_expires = entry.expires
            if entry.expires > self._valid_until:
                entry.expires = self._valid_until
            table = self.handles.setdefault(realm, {})
            table[entry.prefix] = entry
            if ref is not None:
                table[ref] = entry

    def _entries(self) -> list[CachedKey]:
        found = list(self.by_prefix.values()) + list(self.derived.values())
        for refs in self.by_ref.values():
            found.extend(refs.values())
        for table in self.handles.values():  # typed loosely: they share expires/meta/realm
            found.extend(table.values())  # type: ignore[arg-type]
        return found

    def invalidate_lineage(
        self, lineage_id: str, *, marker: object = None, rotation: bool = False
    ) -> None:
        """Drop every entry of a lineage (after a state or policy change).

        ``rotation``: the change was a rotation, which only adds a version and makes the
        previous active one decrypt-only; so only the entries that encrypt (by reference)
        are dropped, and the versions' decryption entries, whose material, policy and
        decryptability did not change, stay (a rotation used to make every decryption of
        the lineage miss). ``marker``: the store's rotation marker after that change (a
        change feed's notice carries it), remembered so the next marker comparison does
        not drop everything.
        """
        if rotation:
            self._drop_where(
                lambda entry: entry.meta.lineage_id == lineage_id,
                keep_decryption=True,
            )
        else:
            self._drop_where(lambda entry: entry.meta.lineage_id == lineage_id)
        if marker is not None:
            with self._check_lock:
                self._marker = marker

    def invalidate_realm(self, realm: str) -> None:
        """Drop every entry of a realm (it was deleted)."""
        self._drop_where(lambda entry: entry.realm == realm)

    def _drop_where(
        self, dropped: Callable[[CachedKey], bool], *, keep_decryption: bool = False
    ) -> None:
        with self._lock:
            self.generation += 1
            self.invalidations += 1
            tables: list[dict] = [*self.by_ref.values(), self.derived]  # type: ignore[type-arg]
            if not keep_decryption:
                tables.append(self.by_prefix)
            handles = [id(table) for table in self.handles.values()]
            tables.extend(self.handles.values())
            for table in tables:
                for k in [k for k, v in table.items() if dropped(v)]:
                    if keep_decryption and table is self.derived and isinstance(k[1], bytes):
                        continue  # a derived key's decryption entry (slot by prefix)
                    if keep_decryption and id(table) in handles and isinstance(k, bytes):
                        continue  # a signing/MAC version's verification entry
                    self._retire(table.pop(k))
                    self.dropped += 1

    def clear(self) -> None:
        with self._lock:
            self.generation += 1
            self._drop_all()

    def _retire(self, old: CachedKey | None, new: CachedKey | None = None) -> None:
        """Keep a dropped entry that reserved usage counts until they are given back
        (called with ``_lock`` held; entries' own locks are taken later, without it)."""
        if old is not None and old is not new and old.reserved:
            self._retired[id(old)] = old

    def flush_retired(self, release: Callable[[str, str, int], None]) -> None:
        """Give back the unused counts of dropped entries (``release(realm, key_id,
        count)``: the store's ``release_usage``); a failing store keeps them for later."""
        if not self._retired:
            return
        with self._lock:
            retired, self._retired = self._retired, {}
        for realm_key, count in _unused(list(retired.values())).items():
            try:
                release(*realm_key, count)
            except Exception:  # unreachable store: over-counted, never under-counted
                log.warning("could not return %d unused usage counts of %s", count, realm_key[1])

    def take_unused(self) -> dict[tuple[str, str], int]:
        """``(realm, key_id) → count`` of every usage count this cache's entries (live
        and dropped) reserved and never used; the entries keep none. For
        :meth:`qimem.app.AppContext.close`."""
        with self._lock:
            entries = {id(e): e for e in self._entries() if isinstance(e, CachedKey)}
            entries.update(self._retired)
            self._retired = {}
        return _unused(list(entries.values()))

    def _drop_all(self) -> None:
        # In place, so a reader holding an inner dict sees the entries go too.
        for entry in self._entries():
            self._retire(entry)
            self.dropped += 1
        for refs in self.by_ref.values():
            refs.clear()
        for table in self.handles.values():
            table.clear()
        self.by_prefix.clear()
        self.derived.clear()


def _unused(entries: list[CachedKey]) -> dict[tuple[str, str], int]:
    """Take the reserved, unused counts out of ``entries`` (under each entry's lock, so
    no count is both issued as a nonce and given back), grouped by version."""
    found: dict[tuple[str, str], int] = {}
    for entry in entries:
        with entry.lock:
            count = entry.unissued + sum(1 for _ in entry.nonces)
            entry.unissued = 0
            entry.nonces = iter(())
        if count:
            slot = (entry.realm, entry.key_id)
            found[slot] = found.get(slot, 0) + count
    return found
