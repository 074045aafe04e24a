"""What a key store plugin opens: a whole backend (keys, identity, plugin catalog, migrate).

A store plugin's factory (hook ``qimem_register_keystores``, see docs/plugins.md) returns
a :class:`Backend` (plugin API 1.1) or, as plugins written for plugin API 1.0 do, a bare
:class:`~qimem.keystore.KeyStore`, which :meth:`Backend.wrap` turns into a backend with no
identity layer and an in-memory plugin catalog.

The backend is where each kind of state lives, so nothing guesses it from the store's
attributes:

* ``keys``: the key store;
* ``identity_database``: a factory of the identity layer's database
  (:class:`qimem.identity.db.Database`), or ``None``: this store has no identity layer, and
  identity operations fail with a :class:`~qimem.errors.ConfigError` saying so;
* ``catalog``: the registered plugin manifests (``qimem plugins register``);
* ``migrate()``: bring the store's schema up to date (a no-op for stores without one);
* ``change_feed()``: optional, a push of other servers' changes
  (:class:`qimem.invalidation.ChangeFeed`), or ``None``: caches poll the store instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from qimem.errors import ConfigError, ConflictError
from qimem.keystore import KeyStore

if TYPE_CHECKING:
    from qimem.identity.db import Database
    from qimem.invalidation import ChangeFeed
    from qimem.manifest import Manifest
    from qimem.root.columns import RootRows

__all__ = ["Backend", "Catalog", "MemoryCatalog"]


class Catalog(Protocol):
    """The registered plugin manifests of a deployment (shared by all users of a store)."""

    def all(self) -> dict[str, dict[str, Any]]:
        """Plugin name → its registered manifest (as :meth:`Manifest.to_dict` made it)."""
        ...

    def add(self, found: Manifest) -> None:
        """Register a manifest.

        :raises ConflictError: a manifest of that plugin is already registered.
        """
        ...

    def remove(self, name: str) -> bool:
        """Forget the manifest of plugin ``name``; whether there was one."""
        ...


def already_registered(name: str) -> ConflictError:
    """The error of registering a second manifest for one plugin."""
    return ConflictError(
        f"a manifest for plugin {name!r} is already registered (remove it first)",
        code="plugin_registered",
    )


class MemoryCatalog:
    """Registered manifests in process memory: they live and die with the process (the
    catalog of ``memory://`` and of stores that bring none)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {}

    def all(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: dict(row) for name, row in self._rows.items()}

    def add(self, found: Manifest) -> None:
        with self._lock:
            if found.name in self._rows:
                raise already_registered(found.name)
            self._rows[found.name] = found.to_dict()

    def remove(self, name: str) -> bool:
        with self._lock:
            return self._rows.pop(name, None) is not None


class Backend:
    """A store's keys, identity database factory, plugin catalog and migrations.

    :param keys: the key store.
    :param scheme: the URL scheme it was opened for (named in errors).
    :param identity_database: builds the identity layer's database on first use; ``None``
        when the store has none.
    :param catalog: builds the plugin catalog on first use; default a :class:`MemoryCatalog`.
    :param migrate: brings the schema up to date; default nothing to do.
    :param identity_with_keys: identity data lives with the keys (the SQL store): realms
        exist before anyone opens the identity layer, so key operations check them. False
        for a database made on demand (the memory store's).
    :param changes: makes a new change feed pushing other servers' changes (optional;
        see :meth:`change_feed`); default none, and caches poll the store.
    :param root_rows: what root rotation moves (:class:`qimem.root.columns.RootRows`: the
        SQLAlchemy engine of the database holding the wrapped rows and their columns);
        default none, and ``qimem root rotate`` refuses the store.
    """

    def __init__(
        self,
        keys: KeyStore,
        *,
        scheme: str,
        identity_database: Callable[[], Database] | None = None,
        catalog: Callable[[], Catalog] | None = None,
        migrate: Callable[[], None] | None = None,
        identity_with_keys: bool = False,
        changes: Callable[[], ChangeFeed] | None = None,
        root_rows: Callable[[], RootRows] | None = None,
    ) -> None:
        if not isinstance(keys, KeyStore):
            raise TypeError(f"keys must be a qimem.keystore.KeyStore, not {type(keys).__name__}")
        self.keys = keys
        self.scheme = scheme
        self.identity_with_keys = identity_with_keys and identity_database is not None
        self._identity_database = identity_database
        self._catalog_factory = catalog or MemoryCatalog
        self._migrate = migrate
        self._catalog: Catalog | None = None
        self._lock = threading.Lock()
        self._changes = changes
        self._feeds: list[ChangeFeed] = []
        self.root_rows = root_rows

    @classmethod
    def wrap(cls, keys: KeyStore, scheme: str) -> Backend:
        """A backend around a bare key store (a plugin API 1.0 factory's result): no
        identity layer, an in-memory plugin catalog."""
        return cls(keys, scheme=scheme)

    @classmethod
    def of(cls, opened: Backend | KeyStore, scheme: str) -> Backend:
        """What a store factory returned, as a backend (a bare key store is wrapped).

        :raises TypeError: neither a :class:`Backend` nor a :class:`KeyStore`.
        """
        if isinstance(opened, Backend):
            return opened
        if isinstance(opened, KeyStore):
            return cls.wrap(opened, scheme)
        raise TypeError(f"{type(opened).__name__} is not a Backend or a KeyStore")

    @property
    def has_identity(self) -> bool:
        """Whether this store has an identity layer."""
        return self._identity_database is not None

    def identity_database(self) -> Database:
        """A new identity database on this store (the caller owns and closes it).

        :raises ConfigError: the store has no identity layer.
        """
        if self._identity_database is None:
            raise ConfigError(
                f"the {self.scheme} store has no identity layer (realms, users and tokens "
                "need a store that provides one, such as sqlite or postgresql)"
            )
        return self._identity_database()

    @property
    def catalog(self) -> Catalog:
        """The registered plugin manifests, opened on first use."""
        with self._lock:
            if self._catalog is None:
                self._catalog = self._catalog_factory()
            return self._catalog

    def migrate(self) -> None:
        """Bring the store's schema up to date (nothing to do for a store without one)."""
        if self._migrate is not None:
            self._migrate()

    @property
    def has_change_feed(self) -> bool:
        """Whether this store pushes changes (see :meth:`change_feed`)."""
        return self._changes is not None

    def change_feed(self) -> ChangeFeed | None:
        """A new feed of the changes committed to this store by any server, or ``None``
        when the store has none (caches then poll :meth:`KeyStore.rotation_marker
        <qimem.keystore.KeyStore.rotation_marker>` and the identity tables).

        The caller starts it (:meth:`ChangeFeed.start <qimem.invalidation.ChangeFeed.start>`)
        in the process that uses it; :meth:`close` stops it. See
        :mod:`qimem.invalidation` and docs/plugins.md ("Pushing changes").
        """
        if self._changes is None:
            return None
        feed = self._changes()
        with self._lock:
            self._feeds.append(feed)
        return feed

    def close(self) -> None:
        """Stop the change feeds handed out, close the key store."""
        with self._lock:
            feeds, self._feeds = self._feeds, []
        for feed in feeds:
            feed.stop()
        self.keys.close()

    def __repr__(self) -> str:
        return f"<Backend {self.scheme} identity={self.has_identity}>"
