"""Threads that miss the key cache for the same key together load it once
(qimem.services.single_flight): the first encrypts after a rotation or a cold start, and
the first decrypts of a version, used to unwrap the same material once per thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_app

from qimem import services
from qimem.app import AppContext
from qimem.services import single_flight
from qimem.testing import run_concurrently

THREADS = 8


@pytest.fixture
def two_contexts(tmp_path: Path, root_key_b64: str) -> Iterator[tuple[AppContext, AppContext]]:
    """Two contexts on one SQLite file: the first writes, the second starts cold."""
    url = f"sqlite:///{tmp_path / 'qimem.db'}"
    writer, cold = make_app(url, root_key_b64), make_app(url, root_key_b64)
    yield writer, cold
    writer.close()
    cold.close()


def _count_loads(app: AppContext, delay: float) -> list[str]:
    """Record each material load of ``app``'s store, each taking ``delay`` seconds more
    (a slow store: the window in which other threads miss too)."""
    loads: list[str] = []
    lock = threading.Lock()
    store = app.store
    original = store.material

    def material(realm: str, key_id: str) -> bytearray:
        with lock:
            loads.append(key_id)
        time.sleep(delay)
        return original(realm, key_id)

    store.material = material  # type: ignore[method-assign]
    return loads


@pytest.fixture
def cold_key(two_contexts: tuple[AppContext, AppContext]) -> tuple[AppContext, bytes]:
    """The cold context and an envelope of key "shared", made by the other one."""
    writer, cold = two_contexts
    services.create_key(writer, name="shared")
    return cold, services.encrypt(writer, "shared", b"before").envelope


def test_threads_missing_one_key_together_load_it_once(cold_key: tuple[AppContext, bytes]) -> None:
    cold, sealed = cold_key
    loads = _count_loads(cold, 0.05)
    results = run_concurrently(THREADS, lambda i: services.encrypt(cold, "shared", b"m%d" % i))
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len(loads) == 1
    opened = run_concurrently(THREADS, lambda _: services.decrypt(cold, sealed).plaintext)
    assert opened == [b"before"] * THREADS
    assert len(loads) == 1  # the encrypt's entry serves decryption of the same version


def test_threads_decrypting_a_cold_version_load_it_once(cold_key: tuple[AppContext, bytes]) -> None:
    cold, sealed = cold_key
    loads = _count_loads(cold, 0.05)
    opened = run_concurrently(THREADS, lambda _: services.decrypt(cold, sealed).plaintext)
    assert opened == [b"before"] * THREADS
    assert len(loads) == 1


def test_a_stuck_load_holds_the_others_back_only_so_long(
    cold_key: tuple[AppContext, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting is bounded: with the store taking longer than WAIT_SECONDS, the waiters load
    by themselves (as before) and every caller still gets its answer."""
    monkeypatch.setattr(single_flight, "WAIT_SECONDS", 0.05)
    cold, _ = cold_key
    loads = _count_loads(cold, 0.3)
    started = time.monotonic()
    results = run_concurrently(4, lambda i: services.encrypt(cold, "shared", b"m%d" % i))
    assert all(not isinstance(r, BaseException) for r in results), results
    assert len(loads) > 1
    assert time.monotonic() - started < 4 * 0.3  # not one load after another


def test_a_load_waits_only_for_its_own_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loads of other slots in flight (a caller sending many derived-key contexts or
    garbage envelopes, each a miss) never hold back a load of this one: with striped locks
    they did, up to WAIT_SECONDS each (a whole second here, so a slow CI is no excuse)."""
    monkeypatch.setattr(single_flight, "WAIT_SECONDS", 1.0)
    holders, release = 400, threading.Event()
    entered = threading.Semaphore(0)

    def hold(i: int) -> None:
        with single_flight.one_load(("decrypt", "attacker", i)):
            entered.release()
            release.wait(10)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(holders)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(holders):
            assert entered.acquire(timeout=10)
        started = time.monotonic()
        with single_flight.one_load(("encrypt", "victim", "key", None)):
            waited = time.monotonic() - started
        assert waited < single_flight.WAIT_SECONDS / 2, waited
    finally:
        release.set()
        for thread in threads:
            thread.join()


def test_a_waiter_goes_ahead_when_the_load_ends_and_the_slot_is_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The waiter of a slot wakes when the first load ends (not after the whole wait),
    and a slot's bookkeeping is gone once nobody loads it, whether the load failed or not."""
    monkeypatch.setattr(single_flight, "WAIT_SECONDS", 5.0)
    loading = threading.Event()

    def first() -> None:
        with pytest.raises(RuntimeError), single_flight.one_load("slot"):
            loading.set()
            time.sleep(0.2)
            raise RuntimeError("the store is down")

    thread = threading.Thread(target=first)
    thread.start()
    assert loading.wait(5)
    started = time.monotonic()
    with single_flight.one_load("slot"):
        waited = time.monotonic() - started
    thread.join()
    assert 0.05 < waited < 2, waited
    assert single_flight.in_flight() == 0
