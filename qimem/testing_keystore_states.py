"""The key store contract's checks of the cache-miss reads,
:meth:`~qimem.keystore.KeyStore.encryption_state` and
:meth:`~qimem.keystore.KeyStore.decryption_state`: mixed into
:class:`qimem.testing.KeyStoreContract`, so every store that runs the contract runs them
(a store that keeps the defaults passes them as it is)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from qimem.errors import NotFoundError, ValidationError
from qimem.keys import KeyState, LineagePolicy, new_id
from qimem.keystore import KeyStore


def _optional(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marked as :func:`qimem.testing.optional_capability` marks (the test skips itself)."""
    test.optional_capability = True  # type: ignore[attr-defined]
    return test


class KeyStoreStatesContract:
    """Each answer equals what the separate calls say; the unwrapping, when given, gives
    the version's material."""

    realm: str
    other_realm: str
    algorithm: str

    def make_material(self) -> bytearray:
        raise NotImplementedError  # KeyStoreContract.make_material

    def test_encryption_state_is_the_active_version_its_policy_and_material(
        self, store: KeyStore
    ) -> None:
        first = self.make_material()
        key = store.create(self.realm, self.algorithm, first, name="states")
        second = self.make_material()
        expected = bytes(second)
        rotated = store.rotate(self.realm, key.key_id, second)
        for ref in ("states", key.lineage_id):
            version, policy, unwrap = store.encryption_state(self.realm, ref)
            assert version == store.get(self.realm, rotated.key_id)
            assert policy == store.policy(self.realm, key.lineage_id)
            assert unwrap is None or bytes(unwrap()) == expected
        for realm, ref in (
            (self.other_realm, "states"),
            (self.realm, "missing"),
            (self.realm, new_id()),
        ):
            with pytest.raises(NotFoundError):
                store.encryption_state(realm, ref)

    def test_decryption_state_is_the_version_its_policy_and_material(self, store: KeyStore) -> None:
        first, second = self.make_material(), self.make_material()
        expected = {}
        v1 = store.create(self.realm, self.algorithm, first)
        expected[v1.key_id] = bytes(store.material(self.realm, v1.key_id))
        v2 = store.rotate(self.realm, v1.key_id, second)
        expected[v2.key_id] = bytes(store.material(self.realm, v2.key_id))
        for key_id, material_expected in expected.items():
            version, policy, unwrap = store.decryption_state(self.realm, key_id)
            assert version == store.get(self.realm, key_id)
            assert policy == store.policy(self.realm, v1.lineage_id)
            assert unwrap is None or bytes(unwrap()) == material_expected
        for realm, key_id in ((self.other_realm, v1.key_id), (self.realm, new_id())):
            with pytest.raises(NotFoundError):
                store.decryption_state(realm, key_id)

    def test_states_carry_a_policy_that_was_set(self, store: KeyStore) -> None:
        key = store.create(self.realm, self.algorithm, self.make_material(), name="ruled")
        policy = LineagePolicy(
            min_decryption_version=1,
            usage_limit=77,
            auto_rotate_seconds=3600,
            deletion_date=datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC),
        )
        try:
            store.set_policy(self.realm, key.lineage_id, policy)
        except ValidationError as exc:  # a store without lineage policies keeps defaults
            if exc.code != "unsupported":
                raise
            policy = LineagePolicy()
        assert store.encryption_state(self.realm, "ruled")[1] == policy
        assert store.decryption_state(self.realm, key.key_id)[1] == policy

    @_optional
    def test_decryption_state_of_a_destroyed_version_gives_no_material(
        self, store: KeyStore
    ) -> None:
        v1 = store.create(self.realm, self.algorithm, self.make_material())
        store.rotate(self.realm, v1.key_id, self.make_material())
        try:
            store.set_state(self.realm, v1.key_id, KeyState.DESTROYED)
        except ValidationError as exc:  # as qimem.testing.optional_capability
            if exc.code != "unsupported":
                raise
            pytest.skip(f"optional capability not supported: {exc.message}")
        version, _, unwrap = store.decryption_state(self.realm, v1.key_id)
        assert version.state is KeyState.DESTROYED
        assert unwrap is None
