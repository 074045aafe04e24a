"""The composition root: one Settings, one build(), a store plugin returning a whole Backend
(keys, identity, catalog, migrate), and plugin API 1.0 stores returning a bare KeyStore."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pluggy
import pytest
from identity_helpers import fast_settings

from qimem import manifest as mf
from qimem import services
from qimem.app import AppContext, build
from qimem.backend import Backend, MemoryCatalog
from qimem.builtin_plugins.memory_keystore import InMemoryKeyStore
from qimem.config import Settings
from qimem.errors import ConfigError
from qimem.hooks import hookimpl
from qimem.registry import make_plugin_manager
from qimem.services import identity as ids

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = {
    "name": "x",
    "version": "1.0.0",
    "description": "a test manifest",
    "qimem_api": ">=1,<2",
    "provides": {"algorithms": ["x-cipher"]},
}


def _custom_store(factory: Any) -> pluggy.PluginManager:
    class Stores:
        @hookimpl
        def qimem_register_keystores(self, register: Any) -> None:
            register("custom", factory)

    pm = make_plugin_manager()
    pm.register(Stores(), name="custom-store")
    return pm


def _app(factory: Any, root_key_b64: str) -> AppContext:
    settings = Settings(store_url="custom://x", root_key_b64=root_key_b64)
    return build(settings, pm=_custom_store(factory))


def test_a_bare_keystore_is_wrapped_without_identity(root_key_b64: str) -> None:
    """A plugin API 1.0 factory (a bare KeyStore) keeps working for keys; identity is
    refused by name instead of silently living in a private in-memory database."""
    with _app(lambda url, wrapper: InMemoryKeyStore(), root_key_b64) as app:
        key = services.create_key(app, name="k")
        assert services.show_key(app, "k").lineage_id == key.lineage_id
        assert not app.backend.has_identity
        assert not app.has_identity  # realms are not checked: there are none
        with pytest.raises(ConfigError, match="the custom store has no identity layer"):
            ids.list_realms(app)
        assert isinstance(app.catalog, MemoryCatalog)


def test_a_backend_factory_brings_its_own_identity_and_catalog(root_key_b64: str) -> None:
    from qimem.identity.db import Database

    catalog = MemoryCatalog()
    migrated: list[bool] = []

    def factory(url: str, wrapper: Any) -> Backend:
        return Backend(
            InMemoryKeyStore(),
            scheme="custom",
            identity_database=Database.in_memory,
            catalog=lambda: catalog,
            migrate=lambda: migrated.append(True),
        )

    with _app(factory, root_key_b64) as app:
        ids.configure(app, fast_settings())
        ids.create_realm(app, "acme")
        assert [r.name for r in ids.list_realms(app)] == ["acme"]
        assert app.catalog is catalog
        app.backend.migrate()
        assert migrated == [True]


def test_memory_backend_offers_an_in_memory_identity_database(memory_app: AppContext) -> None:
    """The documented choice: memory:// has an identity layer on an in-memory SQLite
    database, made on first use (realms are checked once it is open)."""
    assert memory_app.backend.has_identity
    assert not memory_app.backend.identity_with_keys
    assert not memory_app.has_identity
    ids.configure(memory_app, fast_settings())
    ids.identity(memory_app)
    assert memory_app.has_identity


def test_sql_backend_keeps_identity_and_catalog_with_the_keys(
    sqlite_url: str, root_key_b64: str
) -> None:
    settings = Settings(store_url=sqlite_url, root_key_b64=root_key_b64)
    with build(settings) as app:
        assert app.backend.identity_with_keys and app.has_identity
        app.catalog.add(mf.validate(MANIFEST))
    with build(settings) as again:
        assert "x" in again.catalog.all()


def test_identity_settings_come_from_the_one_parsed_settings(memory_app: AppContext) -> None:
    settings = dataclasses.replace(memory_app.config, identity={"access_token_ttl": 42})
    with build(settings) as app:
        assert ids.identity(app).settings.access_token_ttl == 42
    with pytest.raises(ConfigError, match="unknown identity setting 'nope'"):
        build(dataclasses.replace(settings, identity={"nope": 1})).identity  # noqa: B018


def test_nothing_is_stashed_on_the_app_context() -> None:
    """No service writes state into an AppContext's __dict__ or guesses a store's type
    from its attributes: the backend says what it has."""
    offenders = []
    for path in sorted([*ROOT.glob("qimem/**/*.py"), *ROOT.glob("server/*.py")]):
        tree = ast.parse(path.read_text("utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "__dict__":
                base = ast.unparse(node.value)
                if "app" in base:
                    offenders.append(f"{path.name}:{node.lineno} {base}.__dict__")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in {"getattr", "setattr"}
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in {"engine", "store"}
            ):
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert offenders == []
