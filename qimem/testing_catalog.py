"""The plugin catalog contract (:class:`CatalogContract`), re-exported by :mod:`qimem.testing`.

A store plugin whose factory returns a :class:`qimem.backend.Backend` with its own
``catalog`` (plugin API 1.1) checks it by subclassing the contract with a ``catalog``
fixture that yields the backend's catalog, empty::

    class TestRedisCatalog(CatalogContract):
        @pytest.fixture
        def catalog(self):
            factory = Registry(make_plugin_manager(["my-plugin"])).keystores["redis"]
            backend = Backend.of(factory("redis://127.0.0.1:6379/15", wrapper), "redis")
            yield backend.catalog
            backend.close()

What it checks: an empty catalog lists nothing; a registered manifest is listed under its
name exactly as :meth:`qimem.manifest.Manifest.to_dict` gives it; a second manifest of the
same plugin is a :class:`~qimem.errors.ConflictError` (code ``plugin_registered``) that
leaves the first in place; removing says whether there was a manifest; listings are copies.
"""

from __future__ import annotations

from typing import Any

from qimem import manifest as mf
from qimem.backend import Catalog
from qimem.errors import ConflictError

__all__ = ["CatalogContract", "sample_manifest"]


def sample_manifest(name: str = "sample-plugin", version: str = "1.0.0") -> mf.Manifest:
    """A valid manifest of the plugin ``name``."""
    return mf.validate(
        {
            "name": name,
            "version": version,
            "description": f"the {name} test plugin",
            "qimem_api": ">=1,<2",
            "provides": {"algorithms": [f"{name}-cipher"]},
        }
    )


class CatalogContract:
    """Behaviour every plugin catalog (:class:`qimem.backend.Catalog`) must have.

    Subclass it (the name must start with ``Test``) and provide a ``catalog`` fixture.
    """

    def test_empty_catalog_lists_nothing(self, catalog: Catalog) -> None:
        assert catalog.all() == {}

    def test_registered_manifest_is_listed_as_given(self, catalog: Catalog) -> None:
        found = sample_manifest()
        catalog.add(found)
        assert catalog.all() == {found.name: found.to_dict()}

    def test_several_plugins(self, catalog: Catalog) -> None:
        for name in ("alpha", "beta", "gamma"):
            catalog.add(sample_manifest(name))
        assert sorted(catalog.all()) == ["alpha", "beta", "gamma"]

    def test_second_manifest_of_a_plugin_is_refused(self, catalog: Catalog) -> None:
        catalog.add(sample_manifest(version="1.0.0"))
        try:
            catalog.add(sample_manifest(version="2.0.0"))
        except ConflictError as exc:
            assert exc.code == "plugin_registered"
        else:
            raise AssertionError("a second manifest of one plugin was accepted")
        assert catalog.all()["sample-plugin"]["version"] == "1.0.0"

    def test_remove_says_whether_there_was_one(self, catalog: Catalog) -> None:
        catalog.add(sample_manifest())
        assert catalog.remove("sample-plugin") is True
        assert catalog.remove("sample-plugin") is False
        assert catalog.all() == {}
        catalog.add(sample_manifest(version="3.0.0"))  # registrable again
        assert catalog.all()["sample-plugin"]["version"] == "3.0.0"

    def test_listing_is_a_copy(self, catalog: Catalog) -> None:
        catalog.add(sample_manifest())
        listed: dict[str, Any] = catalog.all()
        listed["sample-plugin"]["version"] = "9.9.9"
        listed.pop("sample-plugin")
        assert catalog.all()["sample-plugin"]["version"] == "1.0.0"
