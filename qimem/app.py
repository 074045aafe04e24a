"""AppContext: the configured plugins, key store and key cache every operation runs on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import pluggy

from qimem.config import Config
from qimem.errors import ConfigError, PluginError, QimemError
from qimem.keycache import KeyCache
from qimem.keystore import KeyStore
from qimem.registry import Registry, make_plugin_manager
from qimem.rootkey import KeyWrapper, decode_root_key, read_root_key_file

log = logging.getLogger(__name__)


#: Where :mod:`qimem.services.identity` keeps an app's open identity layer (closed with it).
IDENTITY_ATTR = "_qimem_identity"


class AppContext:
    """What the service functions need: config, plugin registry, store, cache.

    Built lazily, so ``--help`` and errors in arguments never touch the store. Thread-safe
    once built; the HTTP server builds it eagerly with :meth:`open`.
    """

    def __init__(
        self,
        config: Config,
        *,
        pm: pluggy.PluginManager | None = None,
        store: KeyStore | None = None,
    ) -> None:
        self.config = config
        self._pm = pm
        self._lock = threading.RLock()
        if store is not None:
            self.__dict__["store"] = store
        self.cache = KeyCache(config.cache_ttl, revalidate_seconds=config.cache_revalidate)

    @cached_property
    def registry(self) -> Registry:
        with self._lock:
            pm = self._pm or make_plugin_manager(self.config.plugins_enabled)
            return Registry(pm)

    @cached_property
    def wrapper(self) -> KeyWrapper | None:
        """The root key wrapper, from ``QIMEM_ROOT_KEY`` or the root key file, if any."""
        if self.config.root_key_b64:
            key = decode_root_key(self.config.root_key_b64, "QIMEM_ROOT_KEY")
        elif self.config.root_key_file is not None:
            key = read_root_key_file(Path(self.config.root_key_file))
        else:
            return None
        try:
            return KeyWrapper(key)
        finally:
            key[:] = bytes(len(key))

    @cached_property
    def store(self) -> KeyStore:
        with self._lock:
            url = self.config.store_url
            scheme = url.split(":", 1)[0] if ":" in url else ""
            factory = self.registry.keystores.get(scheme)
            if factory is None:
                known = ", ".join(sorted(self.registry.keystores))
                raise ConfigError(f"no key store plugin for {scheme or url!r} (known: {known})")
            if self.wrapper is None and scheme != "memory":
                raise ConfigError("no root key configured (run 'qimem init' or set QIMEM_ROOT_KEY)")
            return self._open_store(factory, url, scheme)

    def _open_store(self, factory: Callable[..., Any], url: str, scheme: str) -> KeyStore:
        """Call a store plugin's factory; anything but a qimem error or a KeyStore is the
        plugin's fault and is reported under its name (without the exception's text, which
        may quote the URL and its password)."""
        try:
            store = factory(url, self.wrapper)
        except QimemError:
            raise
        except Exception as exc:
            log.debug("key store factory failed", exc_info=True)
            plugin = self.registry.keystore_plugin(scheme)
            raise PluginError(
                f"plugin {plugin!r} failed to open the {scheme!r} key store ({type(exc).__name__})"
            ) from None
        if not isinstance(store, KeyStore):
            plugin = self.registry.keystore_plugin(scheme)
            raise PluginError(
                f"plugin {plugin!r}: the {scheme!r} key store factory returned a "
                f"{type(store).__name__}, not a qimem.keystore.KeyStore"
            )
        return store

    def open(self) -> AppContext:
        """Build everything now (plugins, root key, store) and return self."""
        self.registry.algorithms  # noqa: B018
        self.store  # noqa: B018
        return self

    def close(self) -> None:
        identity = self.__dict__.pop(IDENTITY_ATTR, None)
        if identity is not None:  # flush its buffered audit records while the store is open
            identity.close()
        self.cache.clear()
        store = self.__dict__.pop("store", None)
        if store is not None:
            store.close()

    def __enter__(self) -> AppContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AppContext store={self.config.store_url.split('://', 1)[0]}>"


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
    return AppContext(config).open()
