"""One store load at a time per cache slot: the threads that miss the key cache for the
same key together (the first encrypts after a rotation, the first decrypts after an
entry's TTL) wait for the first one's load instead of each reading the store and
unwrapping the same material (the load run measured up to seven loads per rotation with
six threads).

A waiter gives up waiting after :data:`WAIT_SECONDS` and loads by itself, so a load stuck
on an unreachable store costs the others no more than that before they fail on their own
(as they did before). Locks are striped: two slots may share one, which only makes a load
wait for an unrelated one (loads are rare: cache misses)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Iterator

#: Longest wait for another thread's load of the same slot.
WAIT_SECONDS = 0.1
_STRIPES = 64
_locks = [threading.Lock() for _ in range(_STRIPES)]


def _after_fork_in_child() -> None:
    """A lock held by a parent's thread at fork time would stay held in the child."""
    global _locks
    _locks = [threading.Lock() for _ in range(_STRIPES)]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def one_load(slot: Hashable) -> Iterator[None]:
    """Hold ``slot``'s load lock (or go ahead after :data:`WAIT_SECONDS`); the caller
    looks the cache up again first thing inside: a waiter usually finds the entry."""
    lock = _locks[hash(slot) % _STRIPES]
    held = lock.acquire(timeout=WAIT_SECONDS)
    try:
        yield
    finally:
        if held:
            lock.release()
