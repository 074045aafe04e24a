"""The memory:// key store: thread safety and best-effort zeroing of key bytes.

Zeroing is best effort in Python: these tests check the store's own buffers, which are the
only copies it controls (the interpreter and OpenSSL may hold others).
"""

from __future__ import annotations

import gc
import os

import pytest

from qimem.builtin_plugins.memory_keystore import InMemoryKeyStore
from qimem.errors import ConflictError, StoreUnavailableError
from qimem.keys import KeyVersion
from qimem.testing import run_concurrently

THREADS = 16


def _internal_buffers(store: InMemoryKeyStore) -> list[bytearray]:
    buffers = list(store._material.values())
    assert buffers and all(isinstance(b, bytearray) for b in buffers)
    return buffers


def test_concurrent_creates() -> None:
    store = InMemoryKeyStore()
    per_thread = 25

    def create_many(index: int) -> list[tuple[KeyVersion, bytes]]:
        made = []
        for i in range(per_thread):
            material = os.urandom(32)
            realm = "master" if i % 2 else "other"
            made.append(
                (store.create(realm, "aes-256-gcm", material, name=f"t{index}-{i}"), material)
            )
        return made

    results = run_concurrently(THREADS, create_many)
    assert not [r for r in results if isinstance(r, BaseException)]
    made = [pair for result in results for pair in result]
    assert len(made) == THREADS * per_thread
    assert len({k.key_id for k, _ in made} | {k.lineage_id for k, _ in made}) == 2 * len(made)
    assert len(store.list("master")) + len(store.list("other")) == len(made)
    for key, material in made:
        assert store.material(key.realm, key.key_id) == material
        assert store.find_lineage(key.realm, key.name or "") == key.lineage_id
    store.close()


def test_concurrent_creates_of_one_name() -> None:
    store = InMemoryKeyStore()
    names = [f"name-{i}" for i in range(10)]

    def create_all(_: int) -> list[object]:
        outcomes: list[object] = []
        for name in names:
            try:
                outcomes.append(store.create("master", "aes-256-gcm", os.urandom(32), name=name))
            except ConflictError as exc:
                outcomes.append(exc)
        return outcomes

    results = run_concurrently(THREADS, create_all)
    outcomes = [o for result in results for o in result]
    created = [o for o in outcomes if isinstance(o, KeyVersion)]
    refused = [o for o in outcomes if isinstance(o, ConflictError)]
    assert sorted(k.name for k in created) == sorted(names)  # one winner per name
    assert len(refused) == (THREADS - 1) * len(names)
    assert all(e.code == "name_taken" for e in refused)
    assert sorted(k.name for k in store.list("master")) == sorted(names)
    store.close()


def test_concurrent_rotation_chains() -> None:
    """Threads rotating different lineages while others read: every chain is contiguous."""
    store = InMemoryKeyStore()
    keys = [store.create("master", "aes-256-gcm", os.urandom(32)) for _ in range(8)]

    def work(index: int) -> int:
        if index < len(keys):
            current = keys[index]
            for _ in range(20):
                current = store.rotate("master", current.key_id, os.urandom(32))
            return current.version
        reads = 0
        for _ in range(50):
            for listed in store.list("master"):
                store.versions("master", listed.lineage_id)
                store.material("master", listed.key_id)
                reads += 1
        return reads

    results = run_concurrently(2 * len(keys), work)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert results[: len(keys)] == [21] * len(keys)
    for key in keys:
        versions = store.versions("master", key.lineage_id)
        assert [v.version for v in versions] == list(range(1, 22))
        assert [v.active for v in versions].count(True) == 1
    store.close()


def test_close_zeroes_key_buffers() -> None:
    store = InMemoryKeyStore()
    key = store.create("master", "aes-256-gcm", os.urandom(32))
    store.rotate("master", key.key_id, os.urandom(32))
    store.create("other", "chacha20-poly1305", os.urandom(32))
    buffers = _internal_buffers(store)
    assert len(buffers) == 3
    assert all(any(b) for b in buffers)  # real key bytes before
    store.close()
    assert all(len(b) == 32 and not any(b) for b in buffers)
    # A closed store refuses to hand out material, with qimem's own error.
    with pytest.raises(StoreUnavailableError):
        store.material("master", key.key_id)


def test_dropping_the_store_zeroes_key_buffers() -> None:
    store = InMemoryKeyStore()
    store.create("master", "aes-256-gcm", os.urandom(32))
    buffers = _internal_buffers(store)
    assert all(any(b) for b in buffers)
    del store
    gc.collect()
    assert all(not any(b) for b in buffers)


def test_handed_out_material_is_independent_of_close() -> None:
    store = InMemoryKeyStore()
    material = os.urandom(32)
    key = store.create("master", "aes-256-gcm", material)
    copy = store.material("master", key.key_id)
    store.close()
    assert copy == material  # the caller's copy is the caller's to zero


def test_repr_shows_no_key_bytes() -> None:
    store = InMemoryKeyStore()
    material = os.urandom(32)
    store.create("master", "aes-256-gcm", material)
    text = repr(store)
    assert material.hex() not in text and repr(material) not in text
    assert "versions=1" in text
    store.close()
