"""The KeyStore contract (qimem.testing) over every built-in store, built through the registry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from qimem.backend import Backend, Catalog
from qimem.builtin_plugins.memory_keystore import InMemoryKeyStore
from qimem.errors import NotFoundError
from qimem.keys import KeyState, KeyVersion
from qimem.keystore import KeyStore
from qimem.registry import Registry, make_plugin_manager
from qimem.rootkey import KeyWrapper, generate_root_key
from qimem.testing import CatalogContract, KeyStoreContract


def open_store(scheme: str, url: str) -> KeyStore:
    """A store built the way qimem builds it: the registry's factory for ``scheme``."""
    factory = Registry(make_plugin_manager()).keystores[scheme]
    return Backend.of(factory(url, KeyWrapper(generate_root_key())), scheme).keys


class TestMemoryKeyStore(KeyStoreContract):
    @pytest.fixture
    def store(self) -> Iterator[KeyStore]:
        store = open_store("memory", "memory://")
        yield store
        store.close()


class TestSqliteKeyStore(KeyStoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[KeyStore]:
        store = open_store("sqlite", f"sqlite:///{tmp_path / 'keys.db'}")
        yield store
        store.close()


@pytest.mark.postgres
class TestPostgresKeyStore(KeyStoreContract):
    concurrency = 16

    @pytest.fixture
    def store(self, postgres_url: str) -> Iterator[KeyStore]:
        scheme = postgres_url.split("://", 1)[0]
        store = open_store(scheme, postgres_url)
        yield store
        store.close()


# -- the catalog contract, on each built-in backend's catalog -------------------------------


def open_catalog(scheme: str, url: str, root_key: bytes | None = None) -> Iterator[Catalog]:
    """The catalog of a backend built the way qimem builds it (the registry's factory)."""
    factory = Registry(make_plugin_manager()).keystores[scheme]
    wrapper = KeyWrapper(bytearray(root_key) if root_key else generate_root_key())
    backend = Backend.of(factory(url, wrapper), scheme)
    yield backend.catalog
    backend.close()


class TestMemoryCatalog(CatalogContract):
    @pytest.fixture
    def catalog(self) -> Iterator[Catalog]:
        yield from open_catalog("memory", "memory://")


class TestSqliteCatalog(CatalogContract):
    @pytest.fixture
    def catalog(self, tmp_path: Path) -> Iterator[Catalog]:
        yield from open_catalog("sqlite", f"sqlite:///{tmp_path / 'keys.db'}")

    def test_catalog_lives_in_the_store(self, tmp_path: Path) -> None:
        from qimem.testing_catalog import sample_manifest

        url = f"sqlite:///{tmp_path / 'shared.db'}"
        root_key = bytes(generate_root_key())
        for catalog in open_catalog("sqlite", url, root_key):
            catalog.add(sample_manifest())
        for catalog in open_catalog("sqlite", url, root_key):
            assert list(catalog.all()) == ["sample-plugin"]


@pytest.mark.postgres
class TestPostgresCatalog(CatalogContract):
    @pytest.fixture
    def catalog(self, postgres_url: str) -> Iterator[Catalog]:
        yield from open_catalog(postgres_url.split("://", 1)[0], postgres_url)


# -- the contract is able to fail: broken stores are caught --------------------------------


class _SharesBuffers(InMemoryKeyStore):
    """Bug: hands out its internal buffer, so a caller zeroing it destroys the key."""

    def material(self, realm: str, key_id: str) -> bytearray:
        self.get(realm, key_id)
        return self._material[key_id]


class _IgnoresRealm(InMemoryKeyStore):
    """Bug: get() finds keys of any realm."""

    def get(self, realm: str, key_id: str) -> KeyVersion:
        for version in self._versions.values():
            if version.key_id == key_id:
                return version
        raise NotFoundError("no such key")


class _RotatesInactive(InMemoryKeyStore):
    """Bug: rotate() does not check the version is still active (no compare-and-swap)."""

    def rotate(self, realm: str, key_id: str, material: bytes | bytearray) -> KeyVersion:
        current = self.get(realm, key_id)
        with self._lock:
            self._versions[key_id] = replace(current, state=KeyState.ACTIVE)
            return super().rotate(realm, key_id, material)


@pytest.mark.parametrize(
    ("broken", "check"),
    [
        (_SharesBuffers, "test_material_is_a_copy"),
        (_IgnoresRealm, "test_other_realm_is_not_found"),
        (_RotatesInactive, "test_rotate_inactive_names_active"),
        (_RotatesInactive, "test_concurrent_rotations_exactly_one_wins"),
    ],
)
def test_contract_catches_broken_store(broken: type[InMemoryKeyStore], check: str) -> None:
    store = broken()
    try:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            getattr(KeyStoreContract(), check)(store)
    finally:
        store.close()
