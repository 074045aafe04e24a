"""One store load at a time per cache slot: the threads that miss the key cache for the
same key together (the first encrypts after a rotation, the first decrypts after an
entry's TTL) wait for the first one's load instead of each reading the store and
unwrapping the same material (the load run measured up to seven loads per rotation with
six threads).

A waiter gives up waiting after :data:`WAIT_SECONDS` and loads by itself, so a load stuck
on an unreachable store costs the others no more than that before they fail on their own
(as they did before). A load waits only for a load of the same slot: loads of other keys,
contexts or envelopes in flight (many, if a caller sends garbage) never hold it back."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Hashable, Iterator

#: Longest wait for another thread's load of the same slot.
WAIT_SECONDS = 0.1
_guard = threading.Lock()
#: slot → set when its first loader is done (whether it loaded or failed)
_loading: dict[Hashable, threading.Event] = {}


def _after_fork_in_child() -> None:
    """A lock held, or a load in flight, in a parent's thread at fork time would stay so
    in the child, where that thread does not exist."""
    global _guard, _loading
    _guard, _loading = threading.Lock(), {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def in_flight() -> int:
    """How many slots are being loaded now (for tests)."""
    return len(_loading)


@contextlib.contextmanager
def one_load(slot: Hashable) -> Iterator[None]:
    """Load ``slot`` as its first loader, or after waiting (at most :data:`WAIT_SECONDS`)
    for the first loader to finish; the caller looks the cache up again first thing
    inside: a waiter usually finds the entry."""
    with _guard:
        first = _loading.get(slot)
        if first is None:
            done = _loading[slot] = threading.Event()
    if first is not None:
        first.wait(WAIT_SECONDS)
        yield
        return
    try:
        yield
    finally:
        with _guard:
            if _loading.get(slot) is done:
                del _loading[slot]
        done.set()
