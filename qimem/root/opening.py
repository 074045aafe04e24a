"""How a process opens its store's root: the configured provider, and the providers the
keyring's versions were made with (:class:`RootOpener`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qimem.errors import ConfigError, QimemError

if TYPE_CHECKING:
    from qimem.config import Settings
    from qimem.registry import Registry
    from qimem.root.provider import RootKeyProvider
    from qimem.rootkey import KeyWrapper


def configured_provider_name(config: Settings) -> str | None:
    """``[root_key] provider``, else ``env`` when ``QIMEM_ROOT_KEY`` is set, else ``file``
    when a root key file is configured; ``None``: no root configured."""
    if config.root_key_provider is not None:
        return config.root_key_provider
    if config.root_key_b64:
        return "env"
    if config.root_key_file is not None:
        return "file"
    return None


class RootOpener:
    """Builds root-key providers from the registry: the configured one, and the one each
    keyring version records (its recorded settings first; if those no longer open it, the
    config's settings for the same provider, e.g. a key file that moved)."""

    def __init__(self, config: Settings, registry: Callable[[], Registry]) -> None:
        self._config = config
        self._registry_of = registry

    @property
    def _registry(self) -> Registry:
        return self._registry_of()

    @property
    def base_dir(self) -> Path:
        path = self._config.path
        return path.parent if path is not None else Path.cwd()

    def config_settings(self) -> dict[str, Any]:
        """The configured provider's settings (the ``[root_key]`` table but ``provider``)."""
        settings = dict(self._config.root_key_settings)
        if self._config.root_key_file is not None:
            settings.setdefault("file", str(self._config.root_key_file))
        return settings

    def build(self, name: str, settings: Mapping[str, Any]) -> RootKeyProvider:
        """Provider ``name`` built with ``settings``.

        :raises ConfigError: no such provider, or it refused its settings.
        """
        factory = self._registry.root_key_providers.get(name)
        if factory is None:
            known = ", ".join(sorted(self._registry.root_key_providers))
            raise ConfigError(f"no root-key provider {name!r} (known: {known})")
        try:
            provider = factory(dict(settings), self.base_dir)
        except QimemError:
            raise
        except Exception as exc:
            # No traceback, not even at DEBUG: a provider's exception text may quote the
            # settings it was given (a URL with credentials, a PIN it read).
            plugin = self._registry.root_key_provider_plugin(name)
            raise ConfigError(
                f"plugin {plugin!r}: the {name!r} root-key provider failed to open "
                f"({type(exc).__name__})"
            ) from None
        from qimem.root.provider import RootKeyProvider  # not on the CLI's hot path

        if not isinstance(provider, RootKeyProvider):
            raise ConfigError(f"the {name!r} root-key factory returned no root-key provider")
        return provider

    def configured(self) -> RootKeyProvider:
        """The provider the configuration names (new stores and ``qimem root rotate``)."""
        name = configured_provider_name(self._config)
        if name is None:
            raise ConfigError("no root key configured (run 'qimem init' or set QIMEM_ROOT_KEY)")
        return _Fallback(self, name, self.config_settings())

    def previous(self) -> list[Callable[[], RootKeyProvider]]:
        """Makers of the providers ``[[root_key.previous]]`` names (roots being migrated
        away from), each with the settings written there."""
        makers: list[Callable[[], RootKeyProvider]] = []
        for item in self._config.root_key_previous:
            name = str(item["provider"])
            settings = {k: v for k, v in item.items() if k != "provider"}
            makers.append(self._maker(name, settings))
        return makers

    def _maker(self, name: str, settings: dict[str, Any]) -> Callable[[], RootKeyProvider]:
        def make() -> RootKeyProvider:
            return _Fallback(self, name, settings)

        return make

    def for_version(self, name: str, recorded: Mapping[str, Any]) -> RootKeyProvider:
        """The provider of a keyring version: built with its recorded settings (if those
        fail and the config names the same provider, with the config's)."""
        return _Fallback(self, name, dict(recorded))


class _Fallback:
    """A provider built from a version's recorded settings that, when those fail (a moved
    key file, a renamed token), retries once with the config's settings for the same
    provider. The version's recorded check value decides whether the key is the right one."""

    def __init__(self, opener: RootOpener, name: str, settings: dict[str, Any]) -> None:
        self.name = name
        self._opener = opener
        self._settings = settings
        self._inner: RootKeyProvider | None = None

    def _attempt(self, method: str, *args: Any) -> Any:
        try:
            return self._call(method, *args)
        except ConfigError:
            if self.name != configured_provider_name(self._opener._config):
                raise
            other = self._opener.config_settings()
            if {k: self._settings.get(k) for k in other} == other:
                raise
            if self._inner is not None:
                self._inner.close()
            self._inner = self._opener.build(self.name, other)
            return self._call(method, *args)

    def _call(self, method: str, *args: Any) -> Any:
        """``method`` of the provider; anything but a qimem error is the provider's fault,
        reported under its plugin's name without the exception's text."""
        try:
            inner = self._inner or self._opener.build(self.name, self._settings)
            self._inner = inner
            return getattr(inner, method)(*args)
        except QimemError:
            raise
        except Exception as exc:
            plugin = self._opener._registry.root_key_provider_plugin(self.name)
            raise ConfigError(
                f"plugin {plugin!r}: the {self.name!r} root-key provider failed in {method} "
                f"({type(exc).__name__})"
            ) from None

    def wrap(self, key: bytes, context: bytes) -> bytes:
        return bytes(self._attempt("wrap", key, context))

    def unwrap(self, blob: bytes, context: bytes) -> bytearray:
        return bytearray(self._attempt("unwrap", blob, context))

    def read_direct(self) -> bytearray:
        return bytearray(self._attempt("read_direct"))

    def describe(self) -> dict[str, Any]:
        return dict(self._call("describe"))

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None


def make_wrapper(config: Settings, registry: Callable[[], Registry]) -> KeyWrapper | None:
    """The process's root key wrapper: a file or environment key opens at once (the store's
    unkeyringed version 1); any other provider's root opens when the store attaches its
    keyring. ``None``: no root configured. ``registry`` is called only when a provider is
    needed (the CLI's hot path never builds the plugin registry for a file key)."""
    from qimem.rootkey import KeyWrapper, decode_root_key, read_root_key_file

    name = configured_provider_name(config)
    if name is None:
        return None
    opener = RootOpener(config, registry)
    key = None
    if config.root_key_b64:
        key = decode_root_key(config.root_key_b64, "QIMEM_ROOT_KEY")
    elif config.root_key_file is not None and Path(config.root_key_file).exists():
        # With another provider configured, a root key file that still exists is the store's
        # unkeyringed version 1 until 'qimem root rotate' moves the store to the provider.
        # A configured key file that does not exist yet is the new root of a rotation (its
        # store's keyring opens the versions from their recorded files).
        key = read_root_key_file(Path(config.root_key_file))
    if key is None:
        return KeyWrapper.pending(opener.for_version, opener.configured, opener.previous)
    try:
        wrapper = KeyWrapper(key)
    finally:
        key[:] = bytes(len(key))
    wrapper.use_providers(opener.for_version, opener.configured, opener.previous)
    return wrapper


def prepare_before_fork(config: Settings, registry: Callable[[], Registry]) -> None:
    """Before a server starts: read what the configured provider asks for interactively (a
    PKCS#11 PIN from stdin) once, so the workers a pre-fork master forks reuse it instead of
    each reading standard input, and check that the provider can be used now (token, PIN,
    key label: ``check()`` where a provider has one), so a wrong one is one startup error,
    not a worker failing after the fork. ``file`` and ``env`` roots need neither."""
    name = configured_provider_name(config)
    if name in (None, "file", "env"):
        return
    opener = RootOpener(config, registry)
    provider = opener.build(name, opener.config_settings())
    try:
        for step in ("read_stdin_pin", "check"):
            call = getattr(provider, step, None)
            if callable(call):
                call()
    finally:
        provider.close()


def create_configured_key(config: Settings, registry: Callable[[], Registry]) -> None:
    """Have the configured provider make its root key (``create_key()``: a PKCS#11
    provider generates a non-extractable AES-256 key in the token): ``qimem init
    --root-key-setting create_key=true`` and ``qimem root rotate --create-key``.

    :raises ValidationError: the provider cannot make its key.
    :raises ConflictError: the key exists already (it is left alone).
    """
    from qimem.errors import ValidationError

    name = configured_provider_name(config)
    opener = RootOpener(config, registry)
    provider = opener.build(name or "file", opener.config_settings())
    try:
        create = getattr(provider, "create_key", None)
        if not callable(create):
            raise ValidationError(
                f"the {name} root provider cannot create its key; create it the provider's way"
            )
        create()
    finally:
        provider.close()
