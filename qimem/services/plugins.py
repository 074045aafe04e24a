"""Plugin lifecycle: list, show, enable, disable, register and remove (``qimem plugins``,
``/v1/plugins``).

Two kinds of state, kept where they belong:

* **Enabled** plugins are a decision of the host that runs them: whether this process may
  import a package's code. It lives in the config file's ``[plugins] enabled`` list (plus
  ``--plugin`` for one run), never in the store, because plugins are loaded before the
  store is opened (a key store is itself a plugin) and because a shared database must not
  make every server run code it was not configured to trust. :func:`enable_plugin` and
  :func:`disable_plugin` edit that list in the config file.
* **Registered manifests** are a catalog shared by everything using one store: which
  plugins (and versions) a deployment expects. They live in the backend's catalog
  (:attr:`qimem.backend.Backend.catalog`: table ``qimem_plugins`` on SQLite/PostgreSQL; in
  process memory for ``memory://`` and for stores that bring no catalog, living and dying
  with the process).

A listing merges the built-in plugins, the installed ones (the ``qimem`` entry-point
group), the enabled ones and the registered manifests, and says for each whether it is
installed, enabled, loaded and compatible, and why it is not loaded. Loading problems are
isolated: a plugin that fails to import or raises in a hook is reported under its name, and
the listing of every other plugin still works.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from qimem import manifest as mf
from qimem.app import AppContext, build
from qimem.backend import Backend, Catalog
from qimem.config import write_toml
from qimem.errors import ConfigError, ConflictError, NotFoundError, PluginError
from qimem.registry import (
    ENTRY_POINT_GROUP,
    Registry,
    _is_builtin,
    load_failures,
    make_plugin_manager,
)

__all__ = [
    "PluginInfo",
    "disable_plugin",
    "enable_plugin",
    "list_plugins",
    "register_manifest",
    "remove_manifest",
    "show_plugin",
]

_COLLECTING_HOOKS = (
    "qimem_register_algorithms",
    "qimem_register_keystores",
    "qimem_register_auth_providers",
    "qimem_register_root_key_providers",
)


@dataclass
class PluginInfo:
    """What qimem knows about one plugin."""

    name: str
    builtin: bool = False
    installed: bool = False
    enabled: bool = False
    loaded: bool = False
    compatible: bool | None = None  # None: no manifest declares a qimem_api range
    registered: bool = False
    reason: str | None = None  # why it is not loaded (None when loaded)
    module: str | None = None  # the entry point's target, or the built-in module
    distribution: str | None = None  # "name version" of the installed package
    manifest: dict[str, Any] | None = None
    registered_manifest: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of ``--json`` and ``/v1/plugins``."""
        return {
            "name": self.name,
            "builtin": self.builtin,
            "installed": self.installed,
            "enabled": self.enabled,
            "loaded": self.loaded,
            "compatible": self.compatible,
            "registered": self.registered,
            "reason": self.reason,
            "module": self.module,
            "distribution": self.distribution,
            "manifest": self.manifest,
            "registered_manifest": self.registered_manifest,
            "problems": list(self.problems),
        }


def _backend(app: AppContext) -> Backend:
    """The app's backend; when a broken enabled plugin keeps the app's registry from
    building, the backend opened with the plugins that do load (so listing still works)."""
    try:
        return app.backend
    except PluginError:
        pm, _ = _healthy_manager(app.config.plugins_enabled)
        return build(app.config, pm=pm).backend


def _healthy_manager(enabled: list[str]) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """A manager with the enabled plugins that load *and* whose hooks work; the others
    are left out, with the reason, so one broken plugin cannot hide the rest."""
    pm = make_plugin_manager(enabled, isolate=True)
    failures = load_failures(pm)
    for name in enabled:
        plugin = pm.get_plugin(name)
        if plugin is None:
            continue
        failure = _hook_failure(pm, plugin)
        if failure is not None:
            pm.unregister(plugin)
            failures[name] = f"plugin {name!r} {failure}"
    while (clash := _registry_failure(pm)) is not None:
        plugin = pm.get_plugin(clash[0]) if clash[0] else None
        if plugin is None or _is_builtin(clash[0]):
            raise PluginError(clash[1])
        pm.unregister(plugin)
        failures[clash[0]] = clash[1]
    return pm, failures


def _catalog(app: AppContext) -> Catalog:
    """The registered manifests: the catalog of the app's backend (when a broken enabled
    plugin keeps the app's registry from building, of the backend opened without it)."""
    try:
        return app.catalog
    except PluginError:
        pm, _ = _healthy_manager(app.config.plugins_enabled)
        return build(app.config, pm=pm).catalog


# ----------------------------------------------------------------- inspection


def _plugin_manager(app: AppContext) -> tuple[pluggy.PluginManager, dict[str, str]]:
    """The app's own manager when it builds; otherwise an isolated one (so a broken
    enabled plugin is reported instead of hiding every other plugin)."""
    try:
        return app.registry.pm, {}
    except PluginError:
        return _healthy_manager(app.config.plugins_enabled)


def _hook_failure(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """Call a plugin's collecting hooks on their own; the first failure, described."""
    for hook_name in _COLLECTING_HOOKS:
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            args = {"register": lambda *a, **k: None}
            try:
                impl.function(*[args[name] for name in impl.argnames])
            except Exception as exc:
                return f"failed in {hook_name}: {type(exc).__name__}: {exc}"
    return None


def _registry_failure(pm: pluggy.PluginManager) -> tuple[str, str] | None:
    """A validation failure of the whole registry (a clash ...) and the plugin it blames."""
    registry = Registry(pm)
    for attribute in ("algorithms", "keystores", "auth_providers", "root_key_providers"):
        try:
            getattr(registry, attribute)
        except PluginError as exc:
            message = exc.message
            if message.startswith("plugin '"):
                return message.split("'", 2)[1], message
            return "", message
    return None


def _hook_manifest(pm: pluggy.PluginManager, plugin: object) -> tuple[Any, str | None]:
    for impl in pm.hook.qimem_plugin_manifest.get_hookimpls():
        if impl.plugin is plugin:
            try:
                return impl.function(), None
            except Exception as exc:
                return None, f"failed in qimem_plugin_manifest: {type(exc).__name__}: {exc}"
    return None, None


def _apply_manifest(info: PluginInfo, data: Any, source: str) -> None:
    """Record a plugin's own manifest, its validation problems and its compatibility."""
    if data is None:
        return
    found = mf.problems(data)
    if found:
        info.manifest = data if isinstance(data, dict) else None
        info.problems.extend(f"{source}: {p}" for p in found)
    else:
        info.manifest = mf.validate(data).to_dict()
    spec = data.get("qimem_api") if isinstance(data, dict) else None
    if isinstance(spec, str) and not mf.range_problem(spec):
        info.compatible = mf.api_compatible(spec)
        if not info.compatible:
            info.problems.append(mf.incompatibility(info.name, spec))


def _distribution(ep: Any) -> str | None:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    return f"{dist.metadata['Name']} {dist.version}"


def _inspect(app: AppContext) -> dict[str, PluginInfo]:
    pm, failures = _plugin_manager(app)
    enabled = list(dict.fromkeys(app.config.plugins_enabled))
    infos: dict[str, PluginInfo] = {}
    by_plugin_name: dict[str, PluginInfo] = {}  # pluggy name → info

    for plugin_name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        data, manifest_failure = _hook_manifest(pm, plugin)
        builtin = _is_builtin(plugin_name)
        if builtin and isinstance(data, dict) and isinstance(data.get("name"), str):
            name = data["name"]
        else:
            name = plugin_name
        info = PluginInfo(
            name=name,
            builtin=builtin,
            installed=True,
            enabled=True if builtin else plugin_name in enabled,
            loaded=True,
            module=plugin_name if builtin else None,
        )
        _apply_manifest(info, data, "manifest")
        failure = manifest_failure or _hook_failure(pm, plugin)
        if failure:
            info.loaded = False
            info.reason = f"plugin {plugin_name!r} {failure}"
        infos[name] = info
        by_plugin_name[plugin_name] = info
    clash = _registry_failure(pm)
    if clash is not None:
        blamed = by_plugin_name.get(clash[0])
        if blamed is not None and blamed.loaded:
            blamed.loaded = False
            blamed.reason = clash[1]

    installed: dict[str, list[Any]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        installed.setdefault(ep.name, []).append(ep)
    for name, candidates in installed.items():
        info = infos.get(name) or PluginInfo(name=name)
        if info.builtin:
            continue
        info.installed = True
        info.enabled = name in enabled
        info.module = candidates[0].value
        info.distribution = _distribution(candidates[0])
        if info.manifest is None:
            try:
                shipped = mf.read_installed(candidates[0])
            except mf.ManifestError as exc:
                info.problems.append(exc.message)
            else:
                if shipped is not None:
                    _apply_manifest(info, shipped.to_dict(), "manifest")
        if not info.loaded and info.reason is None:
            if name in failures:
                info.reason = failures[name]
            elif info.compatible is False:
                info.reason = mf.incompatibility(name, str(info.manifest["qimem_api"]))  # type: ignore[index]
            elif not info.enabled:
                info.reason = (
                    f"not enabled (run 'qimem plugins enable {name}' or pass --plugin {name})"
                )
            else:
                info.reason = "not loaded"
        infos[name] = info

    for name in enabled:
        if name not in infos:
            infos[name] = PluginInfo(
                name=name,
                enabled=True,
                reason=failures.get(name, f"plugin {name!r} is enabled but not installed"),
            )

    for name, data in _catalog(app).all().items():
        found = infos.get(name)
        if found is None:
            found = infos[name] = PluginInfo(
                name=name, reason="not installed (only its manifest is registered)"
            )
        info = found
        info.registered = True
        info.registered_manifest = data
        if info.manifest is None:
            _apply_manifest(info, data, "registered manifest")
        elif info.manifest.get("version") != data.get("version"):
            info.problems.append(
                f"installed version {info.manifest.get('version')!r} differs from the "
                f"registered manifest's {data.get('version')!r}"
            )
    return infos


def _order(info: PluginInfo) -> tuple[bool, str]:
    return (not info.builtin, info.name)


def list_plugins(app: AppContext) -> list[PluginInfo]:
    """Every plugin qimem knows of: built-in, installed, enabled or registered."""
    return sorted(_inspect(app).values(), key=_order)


def _lookup(infos: dict[str, PluginInfo], name: str) -> PluginInfo:
    info = infos.get(name)
    if info is None:
        info = next((i for i in infos.values() if i.module == name), None)
    if info is None:
        raise NotFoundError(f"no plugin {name!r}", code="plugin_not_found")
    return info


def show_plugin(app: AppContext, name: str) -> PluginInfo:
    """One plugin, by name (or a built-in plugin's module name).

    :raises NotFoundError: qimem knows no such plugin.
    """
    return _lookup(_inspect(app), name)


# ------------------------------------------------------------ registrations


def register_manifest(app: AppContext, data: Any, *, source: str | None = None) -> PluginInfo:
    """Validate a manifest (a parsed TOML table or JSON object) and record it in the store.

    :raises ManifestError: the manifest breaks the schema (every problem named).
    :raises IncompatiblePluginError: its ``qimem_api`` range excludes this qimem.
    :raises ConflictError: a built-in plugin has the name, or it is already registered.
    """
    found = data if isinstance(data, mf.Manifest) else mf.validate(data, source=source)
    found.check_compatible()
    builtin = {i.name for i in _inspect(app).values() if i.builtin}
    if found.name in builtin:
        raise ConflictError(
            f"{found.name!r} is the name of a built-in plugin", code="plugin_registered"
        )
    _catalog(app).add(found)
    return show_plugin(app, found.name)


def remove_manifest(app: AppContext, name: str) -> None:
    """Delete the registered manifest of ``name`` (the package stays installed and its
    enabled state unchanged).

    :raises ConflictError: ``name`` is a built-in plugin.
    :raises NotFoundError: no manifest of that name is registered.
    """
    info = _inspect(app).get(name)
    if info is not None and info.builtin:
        raise ConflictError(f"built-in plugin {name!r} cannot be removed", code="plugin_builtin")
    if not _catalog(app).remove(name):
        raise NotFoundError(f"no registered manifest for plugin {name!r}", code="plugin_not_found")


# ------------------------------------------------------------ enable / disable


def _config_file(app: AppContext) -> tuple[Path, dict[str, Any]]:
    path = app.config.path
    if path is None or not Path(path).is_file():
        raise ConfigError(
            "no config file to record enabled plugins in; run 'qimem init' "
            "(or use --plugin NAME for one run)"
        )
    try:
        doc = tomllib.loads(Path(path).read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{path} cannot be read as TOML ({type(exc).__name__})") from None
    plugins = doc.setdefault("plugins", {})
    if not isinstance(plugins, dict):
        raise ConfigError(f"{path}: [plugins] must be a table")
    enabled = plugins.setdefault("enabled", [])
    if not isinstance(enabled, list) or not all(isinstance(p, str) for p in enabled):
        raise ConfigError(f"{path}: plugins.enabled must be a list of plugin names")
    return Path(path), doc


def enable_plugin(app: AppContext, name: str) -> PluginInfo:
    """Add an installed plugin to the config file's ``plugins.enabled``, after checking it
    loads: installed once, compatible, importable, hooks known and working.

    :raises ValidationError: ``name`` is a built-in plugin (always enabled).
    :raises NotFoundError: no installed package provides ``name``.
    :raises PluginError: the plugin cannot be loaded (incompatible, import error ...).
    :raises ConfigError: there is no config file to record it in.
    """
    infos = _inspect(app)
    info = infos.get(name)
    if info is not None and info.builtin:
        raise ConflictError(f"built-in plugin {name!r} is always enabled", code="plugin_builtin")
    if name not in {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}:
        raise NotFoundError(
            f"plugin {name!r} is not installed (no package has a {ENTRY_POINT_GROUP!r} "
            f"entry point named {name!r})",
            code="plugin_not_installed",
        )
    path, doc = _config_file(app)
    pm = make_plugin_manager([name])  # raises PluginError naming the plugin
    failure = _hook_failure(pm, pm.get_plugin(name))
    if failure is None:
        clash = _registry_failure(pm)
        failure = clash[1] if clash is not None else None
    else:
        failure = f"plugin {name!r} {failure}"
    if failure is not None:
        raise PluginError(failure)
    enabled = doc["plugins"]["enabled"]
    if name not in enabled:
        enabled.append(name)
        write_toml(path, doc)
    if name not in app.config.plugins_enabled:
        app.record_enabled_plugins([*app.config.plugins_enabled, name])
    return _lookup(_inspect(_fresh(app)), name)


def disable_plugin(app: AppContext, name: str) -> PluginInfo | None:
    """Remove ``name`` from the config file's ``plugins.enabled`` (idempotent).

    :raises ConflictError: ``name`` is a built-in plugin.
    :raises ConfigError: there is no config file.
    :return: the plugin as now seen, or ``None`` when qimem no longer knows it at all.
    """
    info = _inspect(app).get(name)
    if info is not None and info.builtin:
        raise ConflictError(f"built-in plugin {name!r} cannot be disabled", code="plugin_builtin")
    path, doc = _config_file(app)
    enabled = doc["plugins"]["enabled"]
    if name in enabled:
        doc["plugins"]["enabled"] = [p for p in enabled if p != name]
        write_toml(path, doc)
    app.record_enabled_plugins([p for p in app.config.plugins_enabled if p != name])
    return _inspect(_fresh(app)).get(name)


def _fresh(app: AppContext) -> AppContext:
    """The same config and store, with a plugin manager built from the current config."""
    return build(app.config, backend=_backend(app))
