"""The composition root: :func:`build` makes the :class:`AppContext` every operation runs on
(plugins, backend, key cache, lifecycle policy and identity layer) from one parsed
:class:`~qimem.config.Settings`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.config import Config, LifecycleSettings, Settings
from qimem.errors import ConfigError, PluginError, QimemError, ValidationError
from qimem.keycache import KeyCache
from qimem.lazylog import get_logger

if TYPE_CHECKING:  # imported on first use: a command pays only for what it touches
    import pluggy

    from qimem.backend import Backend, Catalog
    from qimem.identity import Identity
    from qimem.identity.db import Database
    from qimem.identity.settings import IdentitySettings
    from qimem.keystore import KeyStore
    from qimem.registry import Registry
    from qimem.rootkey import KeyWrapper

log = get_logger(__name__)


class AppContext:
    """What the service functions need: settings, plugin registry, backend, cache.

    Built by :func:`build` from one parsed :class:`~qimem.config.Settings`. Everything is
    built lazily, so ``--help`` and errors in arguments never touch the store; thread-safe
    once built; the HTTP server builds it eagerly with :meth:`open`.

    * :attr:`registry`: the plugins (imported on use);
    * :attr:`backend`: what the store plugin opened (:class:`qimem.backend.Backend`): the
      key store (:attr:`store`), the identity database, the plugin catalog (:attr:`catalog`);
    * :attr:`lifecycle`: the ``[keys]`` policy; :attr:`identity`: the identity layer on the
      backend's identity database (opened on first use, closed with the context).

    ``one_shot``: this process does one job and exits (the CLI). Its usage reservations
    start at one count and grow only while it keeps encrypting, instead of starting at
    ``keys.usage_reserve_block`` (see :mod:`qimem.services.lifecycle`); either way
    :meth:`close` gives the unused rest back to the store.
    """

    def __init__(
        self,
        config: Settings,
        *,
        pm: pluggy.PluginManager | None = None,
        backend: Backend | None = None,
        store: KeyStore | None = None,
        one_shot: bool = False,
        identity_settings: IdentitySettings | None = None,
        lifecycle: LifecycleSettings | None = None,
    ) -> None:
        self.config = config
        self.one_shot = one_shot
        self._pm = pm
        self._lock = threading.RLock()
        if backend is None and store is not None:
            from qimem.backend import Backend

            backend = Backend.wrap(store, _scheme(config.store_url))
        self._backend = backend
        self._identity_settings = identity_settings
        self._lifecycle = lifecycle
        self._identity: Identity | None = None
        self.cache = KeyCache(config.cache_ttl, revalidate_seconds=config.cache_revalidate)

    @property
    def settings(self) -> Settings:
        """The parsed configuration this context was built from."""
        return self.config

    @cached_property
    def registry(self) -> Registry:
        from qimem.registry import Registry, make_plugin_manager

        with self._lock:
            pm = self._pm or make_plugin_manager(self.config.plugins_enabled)
            return Registry(pm)

    @cached_property
    def wrapper(self) -> KeyWrapper | None:
        """The root key wrapper (:func:`qimem.root.opening.make_wrapper`): the configured
        root-key provider's, or ``None`` if no root is configured."""
        from qimem.root.opening import make_wrapper

        return make_wrapper(self.config, lambda: self.registry)

    @property
    def backend(self) -> Backend:
        """The backend the store plugin opened (on first use)."""
        with self._lock:
            if self._backend is None:
                self._backend = self._open_backend()
            return self._backend

    @property
    def store(self) -> KeyStore:
        """The key store of :attr:`backend`."""
        return self.backend.keys

    @property
    def catalog(self) -> Catalog:
        """The registered plugin manifests of :attr:`backend`."""
        return self.backend.catalog

    @property
    def lifecycle(self) -> LifecycleSettings:
        """The lifecycle policy: the config's ``[keys]`` table unless configured."""
        return self._lifecycle or self.config.keys

    def record_enabled_plugins(self, enabled: list[str]) -> None:
        """Record that the config file now enables ``enabled`` (``qimem plugins enable|
        disable`` wrote it): listings from this context show it (its registry, if already
        built, is not rebuilt)."""
        import dataclasses

        self.config = dataclasses.replace(self.config, plugins_enabled=list(enabled))

    def configure_lifecycle(self, settings: LifecycleSettings) -> None:
        """Use ``settings`` instead of the config's ``[keys]`` table."""
        self._lifecycle = settings

    def configure_identity(self, settings: IdentitySettings) -> None:
        """Use ``settings`` instead of the config's ``[identity]`` table (before first use).

        :raises ValidationError: the identity layer is already open.
        """
        with self._lock:
            if self._identity is not None:
                raise ValidationError("identity is already open for this application context")
            self._identity_settings = settings

    @property
    def identity_is_open(self) -> bool:
        """Whether :attr:`identity` has been opened."""
        return self._identity is not None

    @property
    def has_identity(self) -> bool:
        """Whether this context keeps realms: its identity layer is open, or its store
        holds identity data with the keys (the SQL store). A memory store nobody opened
        identity on has none."""
        return self._identity is not None or self.backend.identity_with_keys

    @property
    def identity(self) -> Identity:
        """The identity layer on the backend's identity database, opened on first use.

        Signing keys are wrapped under the root key; a ``memory://`` store without a root
        key gets a random per-process one.

        :raises ConfigError: the store has no identity layer, or a bad ``[identity]`` table.
        """
        with self._lock:
            if self._identity is None:
                self._identity = self._open_identity()
            return self._identity

    def _open_identity(self) -> Identity:
        import os

        from qimem.identity import Identity
        from qimem.identity.settings import settings_from_mapping
        from qimem.rootkey import ROOT_KEY_SIZE, KeyWrapper

        settings = self._identity_settings or settings_from_mapping(
            self.config.identity, str(self.config.path)
        )
        database = self._identity_database()
        wrapper = self.wrapper
        if wrapper is None:
            key = bytearray(os.urandom(ROOT_KEY_SIZE))
            wrapper = KeyWrapper(key)
            key[:] = bytes(ROOT_KEY_SIZE)
        registry = self.registry
        return Identity(database, wrapper, settings, auth_providers=lambda: registry.auth_providers)

    def _identity_database(self) -> Database:
        """The backend's identity database; a plugin factory's own exception is reported
        under the plugin's name without its text (it may quote a URL and its password)."""
        try:
            return self.backend.identity_database()
        except QimemError:
            raise
        except Exception as exc:
            log.debug("identity database factory failed", exc_info=True)
            scheme = self.backend.scheme
            plugin = self.registry.keystore_plugin(scheme)
            raise PluginError(
                f"plugin {plugin!r} failed to open the {scheme!r} store's identity database "
                f"({type(exc).__name__})"
            ) from None

    def close_identity(self) -> None:
        """Flush the identity layer's audit log and release it (the context stays open)."""
        with self._lock:
            found, self._identity = self._identity, None
        if found is not None:
            found.close()

    def _open_backend(self) -> Backend:
        url = self.config.store_url
        scheme = _scheme(url)
        factory = self.registry.keystores.get(scheme)
        if factory is None:
            known = ", ".join(sorted(self.registry.keystores))
            raise ConfigError(f"no key store plugin for {scheme or url!r} (known: {known})")
        if self.wrapper is None and scheme != "memory":
            raise ConfigError("no root key configured (run 'qimem init' or set QIMEM_ROOT_KEY)")
        backend = self._call_factory(factory, url, scheme)
        wrapper = self.wrapper
        if wrapper is not None and wrapper.active_version == 0:
            if scheme != "memory":
                raise ConfigError(
                    f"the {scheme!r} key store keeps no root keyring, so its root cannot be "
                    "held by a root-key provider; use the file or env provider"
                )
            from qimem.root.keyring import MemorySlot

            wrapper.attach(MemorySlot())
        return backend

    def _call_factory(self, factory: Callable[..., Any], url: str, scheme: str) -> Backend:
        """Call a store plugin's factory; anything but a qimem error, a Backend or a
        KeyStore is the plugin's fault and is reported under its name (without the
        exception's text, which may quote the URL and its password)."""
        from qimem.backend import Backend
        from qimem.keystore import KeyStore

        try:
            opened = factory(url, self.wrapper)
        except QimemError:
            raise
        except Exception as exc:
            log.debug("key store factory failed", exc_info=True)
            plugin = self.registry.keystore_plugin(scheme)
            raise PluginError(
                f"plugin {plugin!r} failed to open the {scheme!r} key store ({type(exc).__name__})"
            ) from None
        if isinstance(opened, Backend):
            return opened
        if isinstance(opened, KeyStore):  # a plugin API 1.0 factory: keys only
            return Backend.wrap(opened, scheme)
        plugin = self.registry.keystore_plugin(scheme)
        raise PluginError(
            f"plugin {plugin!r}: the {scheme!r} key store factory returned a "
            f"{type(opened).__name__}, not a qimem.backend.Backend or qimem.keystore.KeyStore"
        )

    def open(self) -> AppContext:
        """Build everything now (plugins, root key, backend) and return self."""
        self.registry.algorithms  # noqa: B018
        self.backend  # noqa: B018
        return self

    def close(self) -> None:
        self.close_identity()  # flush its buffered audit records while the store is open
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            self._release_unused(backend.keys)
        self.cache.clear()
        if backend is not None:
            backend.close()

    def _release_unused(self, store: KeyStore) -> None:
        """Give the store back the usage counts this process reserved and never used, so
        a key's usage shows what was really encrypted (docs/keys.md "Usage limits")."""
        for (realm, key_id), count in self.cache.take_unused().items():
            try:
                store.release_usage(realm, key_id, count)
            except Exception:  # the store is gone: the counts stay reserved (an over-count)
                log.warning("could not return %d unused usage counts of %s", count, key_id)

    def __enter__(self) -> AppContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AppContext store={self.config.store_url.split('://', 1)[0]}>"


def _scheme(url: str) -> str:
    return url.split(":", 1)[0] if ":" in url else ""


def build(
    settings: Settings,
    *,
    pm: pluggy.PluginManager | None = None,
    backend: Backend | None = None,
    one_shot: bool = False,
    identity_settings: IdentitySettings | None = None,
    lifecycle: LifecycleSettings | None = None,
    open: bool = False,
) -> AppContext:
    """The composition root: the :class:`AppContext` of ``settings``.

    Every entry point builds its context here (the CLI, ``qimem serve``,
    :func:`qimem.connect`, :mod:`qimem.testing`).

    :param pm: a plugin manager to use instead of one made from ``settings.plugins_enabled``.
    :param backend: an open backend to use instead of opening one (closing the context
        closes it).
    :param one_shot: this process does one job (the CLI): reserve usage counts one by one.
    :param identity_settings: instead of the ``[identity]`` table (tests, ``qimem serve``).
    :param lifecycle: instead of the ``[keys]`` table.
    :param open: build the registry and backend now (servers), not on first use.
    """
    app = AppContext(
        settings,
        pm=pm,
        backend=backend,
        one_shot=one_shot,
        identity_settings=identity_settings,
        lifecycle=lifecycle,
    )
    return app.open() if open else app


def connect(
    store_url: str = "memory://",
    *,
    root_key: bytes | bytearray | None = None,
    root_key_file: str | Path | None = None,
    plugins: list[str] | None = None,
    cache_ttl: float = 5.0,
) -> AppContext:
    """Open qimem from Python without a config file.

    >>> import qimem
    >>> app = qimem.connect("sqlite:///keys.db", root_key_file="root.key")  # doctest: +SKIP
    """
    import base64

    config = Config(
        store_url=store_url,
        root_key_file=Path(root_key_file) if root_key_file else None,
        root_key_b64=base64.b64encode(bytes(root_key)).decode() if root_key else None,
        plugins_enabled=list(plugins or []),
        cache_ttl=cache_ttl,
    )
    return build(config, open=True)
