"""A contract test suite for :class:`qimem.keystore.KeyStore` implementations.

Every built-in store (``memory://``, SQLite, PostgreSQL) passes this suite, and a third-party
key store plugin can run exactly the same checks against its own backend. It needs pytest
(``pip install 'qimem[test]'``).

Usage: subclass :class:`KeyStoreContract` in a test module (the subclass name must start with
``Test`` so pytest collects it) and provide a ``store`` fixture that yields a fresh, empty
store and closes it afterwards::

    import pytest
    from qimem.testing import KeyStoreContract

    from my_plugin import RedisKeyStore


    class TestRedisKeyStore(KeyStoreContract):
        @pytest.fixture
        def store(self, redis_url):
            store = RedisKeyStore(redis_url)
            yield store
            store.close()

Each ``test_*`` method of the contract then runs against your store. The store must be empty
at the start of each test, or at least hold nothing in the realms :attr:`KeyStoreContract.realm`
and :attr:`KeyStoreContract.other_realm` (override those class attributes if your backend
reserves these names). Building the store through qimem's plugin registry, as the built-in
suite does, also checks that your ``qimem_register_keystores`` hook works::

    from qimem.backend import Backend
    from qimem.registry import Registry, make_plugin_manager
    from qimem.rootkey import KeyWrapper, generate_root_key

    factory = Registry(make_plugin_manager(["my-plugin"])).keystores["redis"]
    opened = factory("redis://127.0.0.1:6379/0", KeyWrapper(generate_root_key()))
    store = Backend.of(opened, "redis").keys  # a Backend, or a bare KeyStore (plugin API 1.0)

What the contract checks (DESIGN.md §3): lineages with versions numbered from 1, one active
version per lineage; names unique within a realm but free across realms; strict realm
scoping (another realm's key is :class:`~qimem.errors.NotFoundError`, never a leak); key
material round trips as a fresh ``bytearray`` the caller may zero; rotation is a
compare-and-swap that turns the old version decrypt-only, refuses an inactive ``key_id``
with :class:`~qimem.errors.KeyNotActiveError` naming the active one, and lets exactly one of
several concurrent rotations win. Lifecycle (issue 7): lineage policies, version states
(disable, enable, destroy: material gone, the active version refused), usage reservations
that never pass their limit (also concurrently), deleting and restoring whole lineages, and
:meth:`~qimem.keystore.KeyStore.rotation_marker` changing on state and policy changes.

Identity (a backend's realms, users, tokens): :class:`qimem.testing_identity.IdentityContract`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from qimem.errors import (
    ConflictError,
    DecryptionError,
    KeyNotActiveError,
    NotFoundError,
    QimemError,
    ValidationError,
)
from qimem.keys import (
    KeyState,
    KeyVersion,
    LineagePolicy,
    LineageRecord,
    VersionRecord,
    new_id,
)
from qimem.keystore import KeyStore
from qimem.testing_catalog import CatalogContract
from qimem.testing_keystore_states import KeyStoreStatesContract

__all__ = ["CatalogContract", "KeyStoreContract", "optional_capability", "run_concurrently"]


def optional_capability(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a contract test of an optional store capability (the lifecycle methods, which
    :class:`~qimem.keystore.KeyStore` refuses by default): it is skipped, not failed, when
    the store refuses with ``ValidationError`` code ``unsupported``. A store that implements
    the capability must pass the test."""

    @functools.wraps(test)
    def wrapper(self: Any, store: KeyStore) -> Any:
        try:
            return test(self, store)
        except ValidationError as exc:
            if exc.code != "unsupported":
                raise
            pytest.skip(f"optional capability not supported: {exc.message}")

    wrapper.optional_capability = True  # type: ignore[attr-defined]
    return wrapper


def run_concurrently(count: int, func: Callable[[int], Any]) -> list[Any]:
    """Call ``func(i)`` for ``i`` in ``range(count)`` from ``count`` threads started together.

    The threads wait on a :class:`threading.Barrier` so the calls really overlap. Returns, in
    thread order, each call's result or the exception it raised (exceptions are returned,
    not raised, so the caller can count outcomes).
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[index] = func(index)
        except BaseException as exc:  # handed back to the caller
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
        if thread.is_alive():
            raise AssertionError("a concurrent worker did not finish within 120 s")
    return results


class KeyStoreContract(KeyStoreStatesContract):
    """The behaviour every :class:`~qimem.keystore.KeyStore` must show.

    Subclass it as ``TestSomething`` and provide a ``store`` fixture returning a fresh store
    (see the module docstring). All tests use only the public KeyStore API; the checks of
    the cache-miss reads come from :class:`~qimem.testing_keystore_states.KeyStoreStatesContract`.
    """

    #: Realm the tests create keys in.
    realm = "contract-a"
    #: A second realm, to check realm scoping.
    other_realm = "contract-b"
    #: Algorithm name recorded on the keys (stores treat it as an opaque label).
    algorithm = "aes-256-gcm"
    #: Number of threads in the concurrent-rotation check.
    concurrency = 8

    def make_material(self) -> bytearray:
        """Fresh random key material for one version (32 bytes)."""
        return bytearray(os.urandom(32))

    # -- create ---------------------------------------------------------------------------

    def test_create_returns_active_version_one(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material(), name="alpha")
        assert isinstance(key, KeyVersion)
        assert key.version == 1
        assert key.state is KeyState.ACTIVE
        assert key.active
        assert key.name == "alpha"
        assert key.realm == self.realm
        assert key.algorithm == self.algorithm
        assert key.key_id != key.lineage_id
        assert key.created_at.tzinfo is not None
        assert store.get(self.realm, key.key_id) == key

    def test_create_without_name(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material())
        assert key.name is None
        assert store.get(self.realm, key.key_id).name is None
        assert store.find_lineage(self.realm, key.lineage_id) == key.lineage_id

    def test_create_gives_fresh_ids(self, store: KeyStore) -> None:
        keys = [store.create(self.realm, self.algorithm, self.make_material()) for _ in range(5)]
        ids = {k.key_id for k in keys} | {k.lineage_id for k in keys}
        assert len(ids) == 10

    def test_name_is_unique_per_realm(self, store: KeyStore) -> None:
        first = store.create(self.realm, self.algorithm, self.make_material(), name="payments")
        with pytest.raises(ConflictError) as info:
            store.create(self.realm, self.algorithm, self.make_material(), name="payments")
        assert info.value.code == "name_taken"
        assert "payments" in str(info.value)
        # The refused create left nothing behind.
        assert [k.key_id for k in store.list(self.realm)] == [first.key_id]
        assert store.find_lineage(self.realm, "payments") == first.lineage_id

    def test_same_name_in_another_realm(self, store: KeyStore) -> None:
        a = store.create(self.realm, self.algorithm, self.make_material(), name="shared")
        b = store.create(self.other_realm, self.algorithm, self.make_material(), name="shared")
        assert a.lineage_id != b.lineage_id
        assert store.find_lineage(self.realm, "shared") == a.lineage_id
        assert store.find_lineage(self.other_realm, "shared") == b.lineage_id

    # -- realm scoping --------------------------------------------------------------------

    def test_get_unknown_is_not_found(self, store: KeyStore) -> None:
        with pytest.raises(NotFoundError):
            store.get(self.realm, new_id())

    def test_other_realm_is_not_found(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material(), name="scoped")
        other = self.other_realm
        with pytest.raises(NotFoundError):
            store.get(other, key.key_id)
        with pytest.raises(NotFoundError):
            store.find_lineage(other, key.lineage_id)
        with pytest.raises(NotFoundError):
            store.find_lineage(other, "scoped")
        with pytest.raises(NotFoundError):
            store.versions(other, key.lineage_id)
        with pytest.raises(NotFoundError):
            store.material(other, key.key_id)
        with pytest.raises(NotFoundError):
            store.rotate(other, key.key_id, self.make_material())
        assert store.list(other) == []
        # The failed rotation from the other realm changed nothing.
        assert store.get(self.realm, key.key_id).state is KeyState.ACTIVE
        assert len(store.versions(self.realm, key.lineage_id)) == 1

    def test_find_lineage_by_name_and_id(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material(), name="orders")
        assert store.find_lineage(self.realm, "orders") == key.lineage_id
        assert store.find_lineage(self.realm, key.lineage_id) == key.lineage_id
        with pytest.raises(NotFoundError):
            store.find_lineage(self.realm, "no-such-name")
        with pytest.raises(NotFoundError):
            store.find_lineage(self.realm, new_id())

    def test_versions_unknown_lineage(self, store: KeyStore) -> None:
        with pytest.raises(NotFoundError):
            store.versions(self.realm, new_id())

    def test_list_is_realm_scoped(self, store: KeyStore) -> None:
        assert store.list(self.realm) == []
        mine = store.create(self.realm, self.algorithm, self.make_material())
        theirs = store.create(self.other_realm, self.algorithm, self.make_material())
        assert [k.key_id for k in store.list(self.realm)] == [mine.key_id]
        assert [k.key_id for k in store.list(self.other_realm)] == [theirs.key_id]

    # -- material -------------------------------------------------------------------------

    def test_material_round_trip(self, store: KeyStore) -> None:
        material = self.make_material()
        key = store.create(self.realm, self.algorithm, material)
        got = store.material(self.realm, key.key_id)
        assert isinstance(got, bytearray)
        assert got == material

    def test_material_is_a_copy(self, store: KeyStore) -> None:
        material = self.make_material()
        expected = bytes(material)
        key = store.create(self.realm, self.algorithm, material)
        material[:] = bytes(len(material))  # the caller zeroes its buffer after create
        got = store.material(self.realm, key.key_id)
        assert got == expected
        got[:] = bytes(len(got))  # ... and zeroes what material() handed out
        assert store.material(self.realm, key.key_id) == expected

    def test_material_unknown_is_not_found(self, store: KeyStore) -> None:
        with pytest.raises(NotFoundError):
            store.material(self.realm, new_id())

    def test_material_accepts_bytes(self, store: KeyStore) -> None:
        material = bytes(self.make_material())
        key = store.create(self.realm, self.algorithm, material)
        assert store.material(self.realm, key.key_id) == material

    # -- rotate ---------------------------------------------------------------------------

    def test_rotate(self, store: KeyStore) -> None:
        old_material, new_material = self.make_material(), self.make_material()
        v1 = store.create(self.realm, self.algorithm, old_material, name="rotating")
        v2 = store.rotate(self.realm, v1.key_id, new_material)
        assert v2.version == 2
        assert v2.state is KeyState.ACTIVE
        assert v2.lineage_id == v1.lineage_id
        assert v2.key_id not in (v1.key_id, v1.lineage_id)
        assert v2.name == "rotating"
        assert v2.realm == self.realm
        assert v2.algorithm == self.algorithm
        assert v2.created_at >= v1.created_at
        assert store.get(self.realm, v1.key_id).state is KeyState.DECRYPT_ONLY
        assert store.get(self.realm, v2.key_id) == v2
        states = [(v.version, v.state) for v in store.versions(self.realm, v1.lineage_id)]
        assert states == [(1, KeyState.DECRYPT_ONLY), (2, KeyState.ACTIVE)]
        # The old version keeps its own material (it must still decrypt).
        assert store.material(self.realm, v1.key_id) == old_material
        assert store.material(self.realm, v2.key_id) == new_material
        assert store.active_version(self.realm, v1.lineage_id).key_id == v2.key_id
        assert store.find_lineage(self.realm, "rotating") == v1.lineage_id

    def test_rotation_numbers_and_names_by_its_own_lineage(self, store: KeyStore) -> None:
        # Another lineage with more versions, made first and after: neither its numbers
        # nor its name may leak into this one's rotation.
        busy = store.create(self.realm, self.algorithm, self.make_material(), name="busy")
        for _ in range(3):
            busy = store.rotate(self.realm, busy.key_id, self.make_material())
        quiet = store.create(self.realm, self.algorithm, self.make_material(), name="quiet")
        rotated = store.rotate(self.realm, quiet.key_id, self.make_material())
        assert (rotated.version, rotated.name) == (2, "quiet")
        assert store.rotate(self.realm, busy.key_id, self.make_material()).version == 5

    def test_rotate_inactive_names_active(self, store: KeyStore) -> None:
        v1 = store.create(self.realm, self.algorithm, self.make_material())
        v2 = store.rotate(self.realm, v1.key_id, self.make_material())
        with pytest.raises(KeyNotActiveError) as info:
            store.rotate(self.realm, v1.key_id, self.make_material())
        assert info.value.code == "key_not_active"
        assert v2.key_id in str(info.value)
        # The refused rotation changed nothing.
        versions = store.versions(self.realm, v1.lineage_id)
        assert [(v.key_id, v.state) for v in versions] == [
            (v1.key_id, KeyState.DECRYPT_ONLY),
            (v2.key_id, KeyState.ACTIVE),
        ]

    def test_rotate_unknown_is_not_found(self, store: KeyStore) -> None:
        with pytest.raises(NotFoundError):
            store.rotate(self.realm, new_id(), self.make_material())

    def test_sequential_rotations_are_contiguous(self, store: KeyStore) -> None:
        rounds = 12
        materials = [self.make_material() for _ in range(rounds + 1)]
        current = store.create(self.realm, self.algorithm, materials[0])
        for material in materials[1:]:
            current = store.rotate(self.realm, current.key_id, material)
        versions = store.versions(self.realm, current.lineage_id)
        assert [v.version for v in versions] == list(range(1, rounds + 2))
        assert [v.state for v in versions] == [KeyState.DECRYPT_ONLY] * rounds + [KeyState.ACTIVE]
        assert len({v.key_id for v in versions}) == rounds + 1
        for version, material in zip(versions, materials, strict=True):
            assert store.material(self.realm, version.key_id) == material

    def test_concurrent_rotations_exactly_one_wins(self, store: KeyStore) -> None:
        v1 = store.create(self.realm, self.algorithm, self.make_material())
        results = run_concurrently(
            self.concurrency, lambda _: store.rotate(self.realm, v1.key_id, self.make_material())
        )
        winners = [r for r in results if isinstance(r, KeyVersion)]
        losers = [r for r in results if isinstance(r, KeyNotActiveError)]
        unexpected = [r for r in results if not isinstance(r, KeyVersion | KeyNotActiveError)]
        assert unexpected == []
        assert len(winners) == 1
        assert len(losers) == self.concurrency - 1
        assert [v.version for v in store.versions(self.realm, v1.lineage_id)] == [1, 2]

    # -- list -----------------------------------------------------------------------------

    def test_list_returns_newest_version_per_lineage(self, store: KeyStore) -> None:
        a1 = store.create(self.realm, self.algorithm, self.make_material(), name="a")
        b1 = store.create(self.realm, self.algorithm, self.make_material(), name="b")
        c1 = store.create(self.realm, self.algorithm, self.make_material())
        a2 = store.rotate(self.realm, a1.key_id, self.make_material())
        a3 = store.rotate(self.realm, a2.key_id, self.make_material())
        listed = store.list(self.realm)
        assert [k.key_id for k in listed] == [a3.key_id, b1.key_id, c1.key_id]
        assert [k.version for k in listed] == [3, 1, 1]
        assert all(k.active for k in listed)
        assert all(isinstance(k, KeyVersion) for k in listed)

    # -- health ---------------------------------------------------------------------------

    def test_ping_healthy_store(self, store: KeyStore) -> None:
        store.ping()  # must not raise
        key = store.create(self.realm, self.algorithm, self.make_material())
        store.ping()  # must not raise
        assert store.get(self.realm, key.key_id) == key

    # -- errors ---------------------------------------------------------------------------

    def test_errors_are_qimem_errors(self, store: KeyStore) -> None:
        calls: list[Callable[[], object]] = [
            lambda: store.get(self.realm, "not-a-key-id"),
            lambda: store.find_lineage(self.realm, ""),
            lambda: store.versions(self.realm, "x" * 36),
            lambda: store.material(self.realm, "'; DROP TABLE keys; --"),
            lambda: store.rotate(self.realm, "nope", self.make_material()),
        ]
        for call in calls:
            with pytest.raises(QimemError) as info:
                call()
            assert isinstance(info.value, NotFoundError)

    # -- lifecycle (issue 7) ----------------------------------------------------------------

    @optional_capability
    def test_policy_defaults_and_set(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material())
        assert store.policy(self.realm, key.lineage_id) == LineagePolicy()
        before = store.rotation_marker()
        when = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
        policy = LineagePolicy(
            min_decryption_version=1,
            min_encryption_version=1,
            usage_limit=1000,
            auto_rotate_seconds=86400,
            deletion_protection=True,
            deletion_date=when,
            derived=True,
        )
        assert store.set_policy(self.realm, key.lineage_id, policy) == policy
        assert store.policy(self.realm, key.lineage_id) == policy
        if before is not None:
            assert store.rotation_marker() != before
        with pytest.raises(NotFoundError):
            store.policy(self.other_realm, key.lineage_id)
        with pytest.raises(NotFoundError):
            store.set_policy(self.other_realm, key.lineage_id, LineagePolicy())
        assert store.policy(self.realm, key.lineage_id) == policy

    @optional_capability
    def test_disable_enable_destroy(self, store: KeyStore) -> None:
        v1 = store.create(self.realm, self.algorithm, self.make_material())
        v2 = store.rotate(self.realm, v1.key_id, self.make_material())
        marker = store.rotation_marker()
        disabled = store.set_state(self.realm, v1.key_id, KeyState.DISABLED)
        assert disabled.state is KeyState.DISABLED
        assert store.get(self.realm, v1.key_id).state is KeyState.DISABLED
        if marker is not None:
            assert store.rotation_marker() != marker
        # Idempotent, and the active version is untouched.
        assert store.set_state(self.realm, v1.key_id, KeyState.DISABLED).state is KeyState.DISABLED
        assert store.get(self.realm, v2.key_id).state is KeyState.ACTIVE
        enabled = store.set_state(self.realm, v1.key_id, KeyState.DECRYPT_ONLY)
        assert enabled.state is KeyState.DECRYPT_ONLY
        store.set_state(self.realm, v1.key_id, KeyState.DESTROYED)
        assert store.get(self.realm, v1.key_id).state is KeyState.DESTROYED
        with pytest.raises(DecryptionError) as info:
            store.material(self.realm, v1.key_id)
        assert info.value.code == "key_destroyed"
        with pytest.raises(ConflictError) as conflict:
            store.set_state(self.realm, v1.key_id, KeyState.DECRYPT_ONLY)
        assert conflict.value.code == "key_destroyed"
        assert store.material(self.realm, v2.key_id)  # the other version is intact

    @optional_capability
    def test_active_version_state_is_refused(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material())
        for target in (KeyState.DISABLED, KeyState.DESTROYED, KeyState.ACTIVE):
            with pytest.raises(ConflictError):
                store.set_state(self.realm, key.key_id, target)
        assert store.get(self.realm, key.key_id).state is KeyState.ACTIVE
        with pytest.raises(NotFoundError):
            store.set_state(self.other_realm, key.key_id, KeyState.DISABLED)

    @optional_capability
    def test_reserve_usage_never_passes_the_limit(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material())
        assert store.reserve_usage(self.realm, key.key_id, 4, 10) == 4
        assert store.reserve_usage(self.realm, key.key_id, 4, 10) == 4
        assert store.reserve_usage(self.realm, key.key_id, 4, 10) == 2
        assert store.reserve_usage(self.realm, key.key_id, 4, 10) == 0
        assert store.usage(self.realm, key.lineage_id) == {key.key_id: 10}
        with pytest.raises(NotFoundError):
            store.reserve_usage(self.other_realm, key.key_id, 1, 10)

    @optional_capability
    def test_concurrent_reservations_add_up(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material())
        store.reserve_usage(self.realm, key.key_id, 0, 20)  # skips when unsupported
        results = run_concurrently(
            self.concurrency, lambda _: store.reserve_usage(self.realm, key.key_id, 3, 20)
        )
        assert all(isinstance(r, int) for r in results), results
        assert sum(results) == min(20, 3 * self.concurrency)
        assert store.usage(self.realm, key.lineage_id)[key.key_id] == sum(results)

    @optional_capability
    def test_delete_lineage(self, store: KeyStore) -> None:
        gone = store.create(self.realm, self.algorithm, self.make_material(), name="gone")
        store.rotate(self.realm, gone.key_id, self.make_material())
        kept = store.create(self.realm, self.algorithm, self.make_material(), name="kept")
        with pytest.raises(NotFoundError):
            store.delete_lineage(self.other_realm, gone.lineage_id)
        store.delete_lineage(self.realm, gone.lineage_id)
        with pytest.raises(NotFoundError):
            store.get(self.realm, gone.key_id)
        with pytest.raises(NotFoundError):
            store.find_lineage(self.realm, "gone")
        assert [k.key_id for k in store.list(self.realm)] == [kept.key_id]
        assert (self.realm, gone.lineage_id) not in store.lineages()
        # The name is free again.
        store.create(self.realm, self.algorithm, self.make_material(), name="gone")

    @optional_capability
    def test_restore_lineage_round_trip(self, store: KeyStore) -> None:
        materials = [self.make_material() for _ in range(3)]
        created = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
        record = LineageRecord(
            lineage_id=new_id(),
            realm=self.realm,
            name="restored",
            algorithm=self.algorithm,
            created_at=created,
            policy=LineagePolicy(min_decryption_version=2, usage_limit=50),
            versions=[
                VersionRecord(new_id(), 1, KeyState.DESTROYED, created, 7, None),
                VersionRecord(new_id(), 2, KeyState.DISABLED, created, 8, materials[1]),
                VersionRecord(new_id(), 3, KeyState.ACTIVE, created, 9, materials[2]),
            ],
        )
        store.restore_lineage(record)
        assert store.find_lineage(self.realm, "restored") == record.lineage_id
        found = store.versions(self.realm, record.lineage_id)
        assert [(v.key_id, v.version, v.state) for v in found] == [
            (r.key_id, r.version, r.state) for r in record.versions
        ]
        assert store.policy(self.realm, record.lineage_id) == record.policy
        assert store.material(self.realm, record.versions[2].key_id) == materials[2]
        assert store.material(self.realm, record.versions[1].key_id) == materials[1]
        with pytest.raises(DecryptionError):
            store.material(self.realm, record.versions[0].key_id)
        usage = store.usage(self.realm, record.lineage_id)
        assert [usage[r.key_id] for r in record.versions] == [7, 8, 9]
        assert (self.realm, record.lineage_id) in store.lineages()
        with pytest.raises(ConflictError):
            store.restore_lineage(record)
        # Rotation continues the restored numbering.
        v4 = store.rotate(self.realm, record.versions[2].key_id, self.make_material())
        assert v4.version == 4
