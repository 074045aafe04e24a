"""AppContext: the configured plugins, key store and key cache every operation runs on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.config import Config
from qimem.errors import ConfigError, PluginError, QimemError
from qimem.keycache import KeyCache

if TYPE_CHECKING:  # imported on first use: a command pays only for what it touches
    import pluggy

    from qimem.keystore import KeyStore
    from qimem.registry import Registry
    from qimem.rootkey import KeyWrapper

log = logging.getLogger(__name__)


#: Where :mod:`qimem.services.identity` keeps an app's open identity layer (closed with it).
IDENTITY_ATTR = "_qimem_identity"


class AppContext:
    """What the service functions need: config, plugin registry, store, cache.

    Built lazily, so ``--help`` and errors in arguments never touch the store. Thread-safe
    once built; the HTTP server builds it eagerly with :meth:`open`.

    ``one_shot``: this process does one job and exits (the CLI). Its usage reservations
    start at one count and grow only while it keeps encrypting, instead of starting at
    ``keys.usage_reserve_block`` (see :mod:`qimem.services.lifecycle`); either way
    :meth:`close` gives the unused rest back to the store.
    """

    def __init__(
        self,
        config: Config,
        *,
        pm: pluggy.PluginManager | None = None,
        store: KeyStore | None = None,
        one_shot: bool = False,
    ) -> None:
        self.config = config
        self.one_shot = one_shot
        self._pm = pm
        self._lock = threading.RLock()
        if store is not None:
            self.__dict__["store"] = store
        self.cache = KeyCache(config.cache_ttl, revalidate_seconds=config.cache_revalidate)

    @cached_property
    def registry(self) -> Registry:
        from qimem.registry import Registry, make_plugin_manager

        with self._lock:
            pm = self._pm or make_plugin_manager(self.config.plugins_enabled)
            return Registry(pm)

    @cached_property
    def wrapper(self) -> KeyWrapper | None:
        """The root key wrapper, from ``QIMEM_ROOT_KEY`` or the root key file, if any."""
        from qimem.rootkey import KeyWrapper, decode_root_key, read_root_key_file

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
        from qimem.keystore import KeyStore

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
        store = self.__dict__.get("store")
        if store is not None:
            self._release_unused(store)
        self.cache.clear()
        store = self.__dict__.pop("store", None)
        if store is not None:
            store.close()

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
