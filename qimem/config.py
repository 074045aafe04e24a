"""Configuration: one TOML file written by ``qimem init``, with environment overrides.

:func:`load_config` is the one parser: it reads the file and the environment once into a
frozen :class:`Settings` (store and root key, cache, limits, plugins, the ``[keys]``
lifecycle policy, and the ``[serve]`` and ``[identity]`` tables, which ``qimem serve`` and
the identity layer validate when they use them, so a command imports only what it needs).

Where things live, by precedence: ``--config`` / ``QIMEM_CONFIG`` for the file;
``QIMEM_HOME`` for a self-contained directory (config, root key and SQLite store);
otherwise the user's config and data directories (platformdirs). ``QIMEM_STORE`` overrides
the store URL, ``QIMEM_ROOT_KEY`` (base64) the root key file.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qimem import fileio
from qimem.errors import ConfigError
from qimem.keys import DEFAULT_USAGE_LIMIT, RANDOM_NONCE_MESSAGE_BOUND

APP_NAME = "qimem"
CONFIG_NAME = "config.toml"
DEFAULT_MAX_ENVELOPE_BYTES = 64 * 1024 * 1024


def config_dir() -> Path:
    home = os.environ.get("QIMEM_HOME")
    if home:
        return Path(home)
    import platformdirs  # only without QIMEM_HOME

    return Path(platformdirs.user_config_dir(APP_NAME))


def data_dir() -> Path:
    home = os.environ.get("QIMEM_HOME")
    if home:
        return Path(home)
    import platformdirs  # only without QIMEM_HOME

    return Path(platformdirs.user_data_dir(APP_NAME))


def default_config_path() -> Path:
    env = os.environ.get("QIMEM_CONFIG")
    return Path(env) if env else config_dir() / CONFIG_NAME


def default_store_url() -> str:
    return f"sqlite:///{data_dir() / 'qimem.db'}"


#: The shortest deletion waiting period accepted by default (AWS KMS's bound), in days.
MIN_DELETION_DAYS = 7


@dataclass(frozen=True)
class LifecycleSettings:
    """Deployment-wide lifecycle settings (the config file's ``[keys]`` table).

    ``usage_limit``: messages per version before automatic rotation, when a lineage sets
    none (default 2^31, half NIST SP 800-38D's 2^32 bound for random 96-bit nonces).
    ``usage_reserve_block``: counts a process reserves from the store at once.
    ``min_deletion_days``: the shortest deletion waiting period accepted.
    """

    usage_limit: int = DEFAULT_USAGE_LIMIT
    usage_reserve_block: int = 64
    min_deletion_days: int = MIN_DELETION_DAYS

    def __post_init__(self) -> None:
        if self.usage_limit < 1 or self.usage_reserve_block < 1 or self.min_deletion_days < 0:
            raise ConfigError("[keys] usage_limit and usage_reserve_block must be at least 1")
        if self.usage_limit > RANDOM_NONCE_MESSAGE_BOUND:
            raise ConfigError(
                f"[keys] usage_limit {self.usage_limit} is above 2^32 "
                f"({RANDOM_NONCE_MESSAGE_BOUND}), the most messages per key with random "
                "96-bit nonces (NIST SP 800-38D); the default is 2^31"
            )


@dataclass(frozen=True)
class TransitSettings:
    """The ``[transit] table``: the Vault-Transit-compatible facade (docs/transit.md),
    served at ``/v1/<mount>`` with authentication unless ``enabled = false``."""

    enabled: bool = True
    mount: str = "transit"


_MOUNT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\Z")


def parse_transit(doc: dict[str, Any], path: Path | str | None) -> TransitSettings:
    """The ``[transit]`` table, checked: ``enabled`` a boolean, ``mount`` one lower-case
    path segment (not ``security``, ``auth`` or ``plugins``, which qimem serves)."""
    table = section(doc, "transit", path)
    unknown = sorted(set(table) - {"enabled", "mount"})
    if unknown:
        raise ConfigError(f"{path}: unknown [transit] setting {unknown[0]!r}")
    enabled = table.get("enabled", True)
    mount = table.get("mount", "transit")
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}: transit.enabled must be true or false")
    if (
        not isinstance(mount, str)
        or not _MOUNT_RE.match(mount)
        or mount in ("security", "auth", "plugins", "openapi.json")
    ):
        raise ConfigError(
            f"{path}: transit.mount must be one lower-case path segment (a-z, 0-9, _ or -) "
            "other than security, auth and plugins"
        )
    return TransitSettings(enabled=enabled, mount=mount)


@dataclass(frozen=True)
class Settings:
    """Everything qimem is configured with, parsed once (see :func:`load_config`).

    ``keys`` is the parsed ``[keys]`` table; ``serve`` and ``identity`` are the
    ``[serve]`` and ``[identity]`` tables as written (``qimem serve`` and
    :func:`qimem.identity.settings.settings_from_mapping` validate them on use).
    """

    store_url: str
    root_key_file: Path | None = None
    root_key_b64: str | None = field(default=None, repr=False)
    #: ``[root_key] provider``: the root-key provider (``file``, ``env``, ``pkcs11``,
    #: ``qimem`` or a plugin's); ``None``: ``env`` if ``QIMEM_ROOT_KEY`` is set, else ``file``.
    root_key_provider: str | None = None
    #: The rest of the ``[root_key]`` table: the provider's settings (no secrets: paths).
    root_key_settings: dict[str, Any] = field(default_factory=dict)
    #: ``[[root_key.previous]]``: roots being migrated away from (each a provider and its
    #: settings), trusted like ``[root_key]`` to authenticate the store's keyring.
    root_key_previous: list[dict[str, Any]] = field(default_factory=list)
    plugins_enabled: list[str] = field(default_factory=list)
    cache_ttl: float = 5.0
    cache_revalidate: float = 0.1
    max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES
    #: The ``[serve]`` table as written (``qimem serve`` validates it: connection_limit,
    #: channel_timeout, request_timeout, cleanup_interval, allowed_hosts, trusted_proxies).
    serve: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    #: The ``[keys]`` table: usage limits, reservation block, deletion waiting period.
    keys: LifecycleSettings = field(default_factory=LifecycleSettings)
    #: The ``[identity]`` table as written (validated when the identity layer opens).
    identity: dict[str, Any] = field(default_factory=dict)
    #: The ``[transit]`` table: the Vault-Transit-compatible facade.
    transit: TransitSettings = field(default_factory=TransitSettings)

    @property
    def source(self) -> str:
        """How errors name this configuration: its file, or ``[identity]`` without one."""
        return str(self.path) if self.path is not None else "config"

    def to_toml(self) -> dict[str, Any]:
        """The TOML document ``qimem init`` writes (never the root key itself)."""
        doc: dict[str, Any] = {
            "store": {"url": self.store_url},
            "plugins": {"enabled": list(self.plugins_enabled)},
            "cache": {"ttl_seconds": self.cache_ttl},
            "limits": {"max_envelope_bytes": self.max_envelope_bytes},
        }
        root: dict[str, Any] = dict(self.root_key_settings)
        if self.root_key_provider is not None:
            root["provider"] = self.root_key_provider
        if self.root_key_file is not None:
            root["file"] = str(self.root_key_file)
        if self.root_key_previous:
            root["previous"] = [dict(item) for item in self.root_key_previous]
        if root:
            doc["root_key"] = root
        return doc

    def write(self, path: Path) -> None:
        """Write the config atomically (temp file + rename), mode 0600; a missing
        directory is created 0700."""
        fileio.make_private_dirs(path.parent)
        write_toml(path, self.to_toml(), mode=0o600)


def write_toml(path: Path, doc: dict[str, Any], *, mode: int | None = None) -> None:
    """Write ``doc`` as TOML to ``path`` atomically: a random, exclusively created temp
    file beside it (:func:`qimem.fileio.create_temp`), fsynced, then renamed over it.
    ``mode`` defaults to the existing file's without group/other write (0600 for a new
    file)."""
    if mode is None:
        mode = path.stat().st_mode & 0o755 if path.exists() else 0o600
    import tomli_w  # writers only (init, plugins enable|disable)

    with fileio.atomic_output(path, force=True, mode=mode) as fh:
        tomli_w.dump(doc, fh)


def _trusted_owner(uid: int) -> bool:
    return uid in (os.geteuid(), 0)


def _check_file(path: Path, shown: Path, info: os.stat_result, *, owners: bool = True) -> None:
    mode = stat.S_IMODE(info.st_mode)
    if owners and not _trusted_owner(info.st_uid):
        raise ConfigError(
            f"config file {shown} belongs to uid {info.st_uid}, not to you (uid "
            f"{os.geteuid()}) or root: its owner could rewrite it; run: "
            f"chown {os.geteuid()} {path} (as root), or write a config of your own"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"config file {shown} is writable by group or others (mode {mode:04o}); "
            f"run: chmod go-w {path}"
        )


def _check_directory(directory: Path, shown: Path) -> None:
    try:
        info = directory.stat()
    except OSError:
        return  # reading the file reports the problem
    mode = stat.S_IMODE(info.st_mode)
    if not _trusted_owner(info.st_uid):
        raise ConfigError(
            f"config file {shown} is in {directory}, which belongs to uid {info.st_uid}, not "
            f"to you (uid {os.geteuid()}) or root: its owner could replace the file; move the "
            "config to a directory of your own"
        )
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise ConfigError(
            f"config file {shown} is in {directory}, which group or others may write (mode "
            f"{mode:04o}, no sticky bit): they could replace the file; run: chmod go-w "
            f"{directory}, or move the config to a private directory"
        )


def check_config_permissions(path: Path) -> None:
    """Refuse a config file that someone else could change: whoever can can point qimem at
    another store, root key or plugins.

    The file (a symlink's target; the link itself too) must belong to the current user or
    root and not be group/other-writable; the directory holding it (the link's and the
    target's) must belong to the current user or root and not be group/other-writable
    unless sticky (like /tmp).

    :raises ConfigError: naming the file, what is wrong and the fix.
    """
    if not hasattr(os, "geteuid"):  # no POSIX owners or directory modes (Windows)
        try:
            _check_file(path, path, path.stat(), owners=False)
        except OSError:
            pass  # reading it reports the problem
        return
    try:
        link = path.lstat()
        target = path.stat()
    except OSError:
        return  # reading it reports the problem
    absolute = Path(os.path.abspath(path))
    _check_directory(absolute.parent, path)
    if stat.S_ISLNK(link.st_mode):
        if not _trusted_owner(link.st_uid):
            raise ConfigError(
                f"config file {path} is a symlink belonging to uid {link.st_uid}, not to you "
                f"(uid {os.geteuid()}) or root: its owner could point it elsewhere; replace it "
                "with a link or file of your own"
            )
        real = Path(os.path.realpath(path))
        _check_directory(real.parent, path)
        _check_file(real, path, target)
    else:
        _check_file(path, path, target)


#: Backwards-compatible name of :class:`Settings`.
Config = Settings


def section(doc: dict[str, Any], name: str, path: Path | str | None) -> dict[str, Any]:
    """The table ``[name]`` of a config document (empty when absent).

    :raises ConfigError: ``[name]`` is not a table (naming the file).
    """
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


_section = section


def read_document(path: Path | None, *, lenient: bool = False) -> dict[str, Any]:
    """The TOML document at ``path`` (empty when there is none).

    :param lenient: a file that cannot be read or parsed gives an empty document instead
        of an error (for the section helpers: :func:`load_config` reports a broken file).
    :raises ConfigError: naming the file, when it is not valid TOML or cannot be read.
    """
    if path is None or not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        if lenient:
            return {}
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        if lenient:
            return {}
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def parse_keys(doc: dict[str, Any], path: Path | str | None) -> LifecycleSettings:
    """The ``[keys]`` table of ``doc`` (defaults when absent).

    :raises ConfigError: naming the file and the bad or unknown setting.
    """
    table = section(doc, "keys", path)
    known = {"usage_limit", "usage_reserve_block", "min_deletion_days"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: unknown [keys] setting {sorted(unknown)[0]!r}")
    try:
        values = {k: int(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: [keys] values must be integers") from None
    try:
        return LifecycleSettings(**values)
    except ConfigError as exc:  # its own checks: name the file too
        raise ConfigError(f"{path}: {exc.message}") from None


def load_config(
    path: Path | None = None,
    *,
    store_url: str | None = None,
    required: bool = True,
    plugins: Iterable[str] = (),
) -> Settings:
    """Read the config file and apply environment and command-line overrides.

    :param path: the config file; default :func:`default_config_path`.
    :param store_url: overrides the file and ``QIMEM_STORE`` (the CLI's ``--store``).
    :param required: raise if the file is missing (otherwise use defaults).
    :param plugins: plugins enabled for this run on top of the file's (``--plugin``).
    :raises ConfigError: a missing (when required) or malformed file, naming the file and
        the setting.
    """
    path = path or default_config_path()
    doc: dict[str, Any] = {}
    if path.exists():
        check_config_permissions(path)
        doc = read_document(path)
    elif required and not (store_url or os.environ.get("QIMEM_STORE")):
        raise ConfigError(f"no configuration at {path}; run 'qimem init' first")

    store = _section(doc, "store", path)
    root = _section(doc, "root_key", path)
    plugins_table = _section(doc, "plugins", path)
    cache = _section(doc, "cache", path)
    limits = _section(doc, "limits", path)
    serve = _section(doc, "serve", path)
    identity = _section(doc, "identity", path)
    keys = parse_keys(doc, path)
    transit = parse_transit(doc, path)
    enabled = plugins_table.get("enabled", [])
    if not isinstance(enabled, list) or not all(isinstance(p, str) for p in enabled):
        raise ConfigError(f"{path}: plugins.enabled must be a list of plugin names")
    enabled = list(dict.fromkeys([*enabled, *plugins]))
    root_file = root.get("file")
    if root_file is None and not doc:
        candidate = data_dir() / "root.key"
        root_file = str(candidate) if candidate.exists() else None
    try:
        return Config(
            store_url=store_url
            or os.environ.get("QIMEM_STORE")
            or store.get("url")
            or default_store_url(),
            root_key_file=Path(root_file) if root_file else None,
            root_key_b64=os.environ.get("QIMEM_ROOT_KEY") or None,
            root_key_provider=_root_provider(root, path),
            root_key_settings={
                k: v for k, v in root.items() if k not in ("provider", "file", "previous")
            },
            root_key_previous=_root_previous(root, path),
            plugins_enabled=list(enabled),
            cache_ttl=float(cache.get("ttl_seconds", 5.0)),
            cache_revalidate=float(cache.get("revalidate_seconds", 0.1)),
            max_envelope_bytes=int(limits.get("max_envelope_bytes", DEFAULT_MAX_ENVELOPE_BYTES)),
            serve=dict(serve),
            path=path,
            keys=keys,
            identity=dict(identity),
            transit=transit,
        )
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: a [cache] or [limits] value is not a number") from None


def _root_provider(root: dict[str, Any], path: Path) -> str | None:
    provider = root.get("provider")
    if provider is None:
        return None
    from qimem.root.provider import PROVIDER_NAME

    if not isinstance(provider, str) or not PROVIDER_NAME.match(provider):
        raise ConfigError(f"{path}: root_key.provider must be a provider name")
    return provider


def _root_previous(root: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    previous = root.get("previous", [])
    if not isinstance(previous, list) or not all(
        isinstance(item, dict) and isinstance(item.get("provider"), str) for item in previous
    ):
        raise ConfigError(
            f"{path}: [[root_key.previous]] must be tables, each with a provider name"
        )
    for item in previous:
        _root_provider(item, path)
    return [dict(item) for item in previous]
