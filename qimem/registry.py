"""The plugin registry: one pluggy manager, and collectors that validate what plugins give.

Built-in plugins are registered through exactly the hooks third-party packages use.
Third-party packages are found in the ``qimem`` entry-point group and loaded only when
enabled (config ``plugins.enabled`` or ``--plugin``): a security tool does not run code just
because it is installed, and a process with no third-party plugin enabled never scans the
entry points at all (``importlib.metadata`` is imported only then).

What a plugin provides may be registered as a ``"module:attr"`` reference
(:mod:`qimem.references`): it is imported on first use, so a command imports only the
algorithm and the key store it uses.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from functools import cached_property
from typing import TYPE_CHECKING, Any, overload

import pluggy

from qimem import references
from qimem.crypto import DEFAULT_PURPOSE, PURPOSES, purpose_of
from qimem.errors import PluginError, QimemError, UnsupportedAlgorithmError, ValidationError
from qimem.hooks import specs
from qimem.hooks.markers import PROJECT
from qimem.lazylog import get_logger

if TYPE_CHECKING:
    from qimem.backend import Backend
    from qimem.crypto import Algorithm
    from qimem.events import KeyEvent
    from qimem.keystore import KeyStore
    from qimem.rootkey import KeyWrapper

log = get_logger(__name__)

ENTRY_POINT_GROUP = "qimem"
DEFAULT_PLUGINS = (
    "qimem.builtin_plugins.aes_gcm",
    "qimem.builtin_plugins.chacha20",
    "qimem.builtin_plugins.key_purposes",
    "qimem.builtin_plugins.memory_keystore",
    "qimem.builtin_plugins.sql_keystore",
    "qimem.builtin_plugins.password_auth",
    "qimem.builtin_plugins.ldap_auth",
    "qimem.builtin_plugins.jwt_auth",
    "qimem.builtin_plugins.root_file",
    "qimem.builtin_plugins.root_pkcs11",
    "qimem.builtin_plugins.root_qimem",
)

#: A store plugin's factory: ``factory(url, wrapper)`` returns a :class:`qimem.backend.Backend`
#: (plugin API 1.1) or a bare :class:`qimem.keystore.KeyStore` (1.0).
KeyStoreFactory = Callable[[str, "KeyWrapper"], "Backend | KeyStore"]
#: ``register(algorithm)``, or ``register("module:attr", name=..., algorithm_id=...)``
#: (plugin API 1.2: ``purpose=...`` too, for a non-AEAD algorithm named by reference).
RegisterAlgorithm = Callable[..., None]
#: ``register(scheme, factory)``; ``factory`` may be a ``"module:attr"`` reference.
RegisterKeyStore = Callable[[str, "KeyStoreFactory | str"], None]
RegisterAuthProvider = Callable[[str, Any], None]

_ALGORITHM_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,63}$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")


def entry_points(group: str) -> Any:
    """``importlib.metadata.entry_points(group=...)``, imported only when needed."""
    from importlib.metadata import entry_points as scan

    return scan(group=group)


def installed_plugins() -> dict[str, str]:
    """Entry points of the ``qimem`` group: plugin name → ``module:attr`` it names."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def providers_of(algorithm: str | None, loaded: Iterable[str] = ()) -> list[str]:
    """Installed plugins not in ``loaded`` whose shipped manifest says they provide the
    algorithm called ``algorithm`` (any algorithm, if None); read from the manifest file:
    no plugin code runs."""
    from qimem import manifest

    found = []
    try:
        candidates = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken installation: no hint rather than a second error
        return []
    for ep in candidates:
        if ep.name in loaded:
            continue
        try:
            shipped = manifest.read_installed(ep)
        except Exception:  # an invalid manifest: 'qimem plugins list' reports it
            shipped = None
        provides = shipped.provides if shipped is not None else {}
        algorithms = provides.get("algorithms") or []
        if algorithm in algorithms or (algorithm is None and algorithms):
            found.append(ep.name)
    return sorted(set(found))


def _not_enabled_hint(algorithm: str | None, loaded: Iterable[str]) -> str:
    """``algorithm`` None: an unknown algorithm id, which manifests do not list; then every
    installed, not enabled plugin that provides some algorithm is named."""
    plugins = providers_of(algorithm, loaded)
    if not plugins:
        return ""
    names = " or ".join(repr(p) for p in plugins)
    first = plugins[0]
    return (
        f"; it {'is' if algorithm else 'may be'} provided by the installed plugin {names}, "
        "which is not enabled "
        f"(run 'qimem plugins enable {first}' or pass '--plugin {first}')"
    )


def make_plugin_manager(
    enabled: Iterable[str] = (),
    *,
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    isolate: bool = False,
) -> pluggy.PluginManager:
    """A fresh plugin manager with the built-in plugins and the enabled third-party ones.

    An enabled plugin whose manifest (the ``qimem_plugin.toml`` it ships, read before its
    code is imported, or what its ``qimem_plugin_manifest`` hook returns) declares a
    ``qimem_api`` range excluding this qimem's plugin API is refused.

    :param isolate: instead of raising, leave out each enabled plugin that cannot be loaded
        and record why (see :func:`load_failures`); the other plugins load normally.
    :raises PluginError: an enabled plugin is not installed, fails to import, is
        incompatible or implements an unknown hook (unless ``isolate``).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(specs)
    failures: dict[str, str] = {}
    pm.qimem_load_failures = failures  # type: ignore[attr-defined]
    wanted = list(dict.fromkeys(enabled))
    if wanted:
        available: dict[str, list[Any]] = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            available.setdefault(ep.name, []).append(ep)
        for name in wanted:
            try:
                _load_enabled(pm, name, available.get(name))
            except PluginError as exc:
                if not isolate:
                    raise
                failures[name] = exc.message
    for module_name in builtins:
        pm.register(importlib.import_module(module_name), name=module_name)
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            unknown = sorted(
                hook_name
                for hook_name, caller in vars(pm.hook).items()
                if isinstance(caller, pluggy.HookCaller)
                and not caller.has_spec()
                and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls())
            )
            error = PluginError(
                f"plugin {name!r} implements unknown hook(s) {', '.join(unknown) or '?'} "
                "(the hooks are listed in qimem.hooks.specs)"
            )
            if not isolate or _is_builtin(name):
                raise error from exc
            pm.unregister(exc.plugin)
            failures[name] = error.message
    return pm


def load_failures(pm: pluggy.PluginManager) -> dict[str, str]:
    """Plugin name → why it was left out, for a manager made with ``isolate=True``."""
    return dict(getattr(pm, "qimem_load_failures", {}))


def _load_enabled(pm: pluggy.PluginManager, name: str, candidates: list[Any] | None) -> None:
    """Check, import and register one enabled third-party plugin.

    :raises PluginError: naming the plugin and what is wrong.
    """
    from qimem import manifest

    if not candidates:
        raise PluginError(f"plugin {name!r} is enabled but not installed")
    if len({c.value for c in candidates}) > 1:
        # A security tool must not pick one of two packages claiming a name.
        sources = ", ".join(sorted(_distribution(c) for c in candidates))
        raise PluginError(
            f"plugin {name!r} is provided by more than one installed package "
            f"({sources}); uninstall all but one"
        )
    ep = candidates[0]
    try:
        shipped = manifest.read_installed(ep)  # before any of its code runs
    except manifest.ManifestError as exc:
        raise PluginError(f"plugin {name!r} ships an invalid manifest: {exc.message}") from None
    if shipped is not None and not shipped.compatible:
        raise PluginError(manifest.incompatibility(name, shipped.qimem_api))
    try:
        plugin = ep.load()
        pm.register(plugin, name=name)
    except QimemError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {name!r} failed to load: {type(exc).__name__}: {exc}") from exc
    declared = _declared_api(pm, plugin)
    if declared is not None and not manifest.api_compatible(declared):
        pm.unregister(plugin)
        raise PluginError(manifest.incompatibility(name, declared))


def _declared_api(pm: pluggy.PluginManager, plugin: object) -> str | None:
    """The ``qimem_api`` range a loaded plugin's manifest hook declares, if a valid one."""
    from qimem import manifest

    for impl in pm.hook.qimem_plugin_manifest.get_hookimpls():
        if impl.plugin is not plugin:
            continue
        try:
            declared = impl.function()
        except Exception:
            return None  # reported when the manifests are collected
        spec = declared.get("qimem_api") if isinstance(declared, dict) else None
        if isinstance(spec, str):
            try:
                manifest.version_in_range(manifest.PLUGIN_API_VERSION, spec)
            except QimemError:
                return None  # malformed: reported by the listing's manifest validation
            return spec
    return None


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    name = dist.metadata["Name"] if dist is not None else None
    return f"{name or '?'} ({ep.value})"


def _validate_declared(name: object, algorithm_id: object, purpose: object) -> str | None:
    """What is wrong with the name, id and purpose declared with an algorithm reference."""
    if not isinstance(name, str) or not _ALGORITHM_NAME.match(name):
        return f"algorithm name {name!r} is not a lowercase name like 'aes-256-gcm'"
    if type(algorithm_id) is not int or not 1 <= algorithm_id <= 255:
        return f"algorithm {name!r}: algorithm_id must be an integer in 1..255"
    if purpose not in PURPOSES:
        return f"algorithm {name!r}: purpose {purpose!r} is not one of {', '.join(PURPOSES)}"
    return None


def _validate_algorithm(algorithm: Any) -> str | None:
    """What is wrong with an object offered as an algorithm, or None."""
    name = getattr(algorithm, "name", None)
    if not isinstance(name, str) or not _ALGORITHM_NAME.match(name):
        return f"algorithm name {name!r} is not a lowercase name like 'aes-256-gcm'"
    purpose = purpose_of(algorithm)
    if purpose not in PURPOSES:
        return f"algorithm {name!r}: purpose {purpose!r} is not one of {', '.join(PURPOSES)}"
    if purpose != DEFAULT_PURPOSE:
        return _validate_purpose(algorithm, name, purpose)
    for attr, low, high in (
        ("algorithm_id", 1, 255),
        ("key_size", 16, 64),
        ("nonce_size", 8, 32),
        ("tag_size", 12, 32),
    ):
        value = getattr(algorithm, attr, None)
        if type(value) is not int or not low <= value <= high:
            return f"algorithm {name!r}: {attr} must be an integer in {low}..{high}"
    for method in ("generate_key", "cipher", "encrypt", "decrypt"):
        if not callable(getattr(algorithm, method, None)):
            return f"algorithm {name!r} has no {method}() method"
    return None


def _validate_purpose(algorithm: Any, name: str, purpose: str) -> str | None:
    """:func:`_validate_algorithm` for a ``sign``, ``mac`` or ``deterministic`` algorithm
    (the protocols of :mod:`qimem.crypto_purposes`, imported only now)."""
    from qimem.crypto_purposes import REQUIRED

    methods, sizes = REQUIRED[purpose]
    for attr, low, high in (("algorithm_id", 1, 255), *sizes):
        value = getattr(algorithm, attr, None)
        if type(value) is not int or not low <= value <= high:
            return f"algorithm {name!r}: {attr} must be an integer in {low}..{high}"
    for method in methods:
        if not callable(getattr(algorithm, method, None)):
            return f"{purpose} algorithm {name!r} has no {method}() method"
    return None


class Registry:
    """What the loaded plugins provide, collected once and validated."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm

    def _collect_algorithms(self) -> None:
        """Call every ``qimem_register_algorithms`` once: names and ids, objects or
        references (imported later, by :meth:`algorithm`)."""
        if hasattr(self, "_algorithm_slots"):
            return
        # name -> [object or None, reference, plugin, id, purpose]
        slots: dict[str, list[Any]] = {}
        by_id: dict[int, str] = {}
        current: list[str] = [""]

        def register(
            algorithm: Any,
            *,
            name: str | None = None,
            algorithm_id: int | None = None,
            purpose: str | None = None,
        ) -> None:
            plugin = current[0]
            declared_purpose = DEFAULT_PURPOSE if purpose is None else purpose
            if references.is_reference(algorithm):
                problem = _validate_declared(name, algorithm_id, declared_purpose)
                declared_name, declared_id, slot = name, algorithm_id, [None, algorithm]
            elif name is not None or algorithm_id is not None or purpose is not None:
                problem = "name=, algorithm_id= and purpose= go with a 'module:attr' reference only"
                declared_name, declared_id, slot = None, None, []
            else:
                problem = _validate_algorithm(algorithm)
                declared_name = getattr(algorithm, "name", None)
                declared_id = getattr(algorithm, "algorithm_id", None)
                declared_purpose = purpose_of(algorithm)
                slot = [algorithm, None]
            if problem is None and declared_name in slots:
                problem = f"algorithm {declared_name!r} is already registered"
            if problem is None and declared_id in by_id:
                other = by_id[declared_id]  # type: ignore[index]
                problem = f"algorithm id {declared_id} is already used by {other!r}"
            if problem is not None:
                raise PluginError(f"plugin {plugin!r}: {problem}")
            assert isinstance(declared_name, str) and isinstance(declared_id, int)
            slots[declared_name] = [*slot, plugin, declared_id, declared_purpose]
            by_id[declared_id] = declared_name

        for impl in _impls(self.pm.hook.qimem_register_algorithms):
            current[0] = impl.plugin_name
            _call_one(impl, "qimem_register_algorithms", register=register)
        self._algorithm_ids = by_id
        self._algorithm_slots = slots

    def _resolve_algorithm(self, name: str) -> Algorithm:
        """The object of a collected algorithm, importing its reference on first use."""
        slot = self._algorithm_slots[name]
        if slot[0] is None:
            reference, plugin, algorithm_id, purpose = slot[1], slot[2], slot[3], slot[4]
            loaded = references.resolve(reference, plugin)
            if isinstance(loaded, type):
                loaded = loaded()
            problem = _validate_algorithm(loaded)
            if problem is None and (
                getattr(loaded, "name", None) != name
                or loaded.algorithm_id != algorithm_id
                or purpose_of(loaded) != purpose
            ):
                problem = (
                    f"{reference!r} is not the algorithm {name!r} "
                    f"(id {algorithm_id}, purpose {purpose})"
                )
            if problem is not None:
                raise PluginError(f"plugin {plugin!r}: {problem}")
            slot[0] = loaded
        return slot[0]  # type: ignore[no-any-return]

    @property
    def algorithm_names(self) -> list[str]:
        """The names of every registered algorithm, of every purpose (nothing imported)."""
        self._collect_algorithms()
        return sorted(self._algorithm_slots)

    @property
    def algorithm_purposes(self) -> dict[str, str]:
        """Algorithm name → its purpose (``encrypt``, ``sign`` ...), nothing imported."""
        self._collect_algorithms()
        return {name: slot[4] for name, slot in sorted(self._algorithm_slots.items())}

    @cached_property
    def algorithms(self) -> dict[str, Algorithm]:
        """AEAD algorithm name → algorithm (purpose ``encrypt``, as before plugin API 1.2),
        from ``qimem_register_algorithms`` (imports every referenced AEAD: the hot paths use
        :meth:`algorithm` instead). Other purposes: :meth:`algorithms_for`."""
        return self.algorithms_for(DEFAULT_PURPOSE)

    def algorithms_for(self, purpose: str) -> dict[str, Any]:
        """Algorithm name → algorithm, for the algorithms of ``purpose`` (imports them)."""
        self._collect_algorithms()
        return {
            name: self._resolve_algorithm(name)
            for name, slot in sorted(self._algorithm_slots.items())
            if slot[4] == purpose
        }

    def _check_purpose(self, name: str, purpose: str) -> None:
        actual = self._algorithm_slots[name][4]
        if actual != purpose:
            raise ValidationError(
                f"algorithm {name!r} serves purpose {actual!r}, not {purpose!r}",
                code="wrong_purpose",
            )

    @overload
    def algorithm(self, name: str) -> Algorithm: ...
    @overload
    def algorithm(self, name: str, purpose: str) -> Any: ...

    def algorithm(self, name: str, purpose: str = DEFAULT_PURPOSE) -> Any:
        """The algorithm called ``name``, which must serve ``purpose`` (default: an AEAD).

        :raises UnsupportedAlgorithmError: no loaded plugin provides it (the message names
            an installed plugin that would, and how to enable it).
        :raises ValidationError: ``wrong_purpose``: it serves another purpose (both named).
        """
        self._collect_algorithms()
        if isinstance(name, str) and name in self._algorithm_slots:
            self._check_purpose(name, purpose)
            return self._resolve_algorithm(name)
        known = ", ".join(
            sorted(n for n, slot in self._algorithm_slots.items() if slot[4] == purpose)
        )
        hint = _not_enabled_hint(name, self.plugin_names()) if isinstance(name, str) else ""
        raise UnsupportedAlgorithmError(f"unknown algorithm {name!r} (available: {known}){hint}")

    @overload
    def algorithm_by_id(self, algorithm_id: int) -> Algorithm: ...
    @overload
    def algorithm_by_id(self, algorithm_id: int, purpose: str) -> Any: ...

    def algorithm_by_id(self, algorithm_id: int, purpose: str = DEFAULT_PURPOSE) -> Any:
        """The algorithm with envelope id ``algorithm_id``, which must serve ``purpose``.

        :raises UnsupportedAlgorithmError: no loaded plugin provides it.
        :raises ValidationError: ``wrong_purpose``: it serves another purpose (both named).
        """
        self._collect_algorithms()
        name = self._algorithm_ids.get(algorithm_id)
        if name is None:
            hint = _not_enabled_hint(None, self.plugin_names())
            raise UnsupportedAlgorithmError(
                f"unknown algorithm id {algorithm_id}"
                + (hint or " (is the plugin that provides it enabled? see 'qimem plugins list')")
            )
        self._check_purpose(name, purpose)
        return self._resolve_algorithm(name)

    def plugin_names(self) -> list[str]:
        """The names of the registered plugins."""
        return [name for name, _ in self.pm.list_name_plugin()]

    @cached_property
    def keystores(self) -> dict[str, KeyStoreFactory]:
        """URL scheme → key store factory, from ``qimem_register_keystores``."""
        factories: dict[str, KeyStoreFactory] = {}
        current: list[str] = [""]

        def register(scheme: str, factory: KeyStoreFactory) -> None:
            if not isinstance(scheme, str) or not _SCHEME.match(scheme):
                raise PluginError(f"plugin {current[0]!r}: bad key store scheme {scheme!r}")
            if references.is_reference(factory):
                factory = references.LazyFactory(factory, current[0])  # type: ignore[arg-type]
            elif not callable(factory):
                raise PluginError(f"plugin {current[0]!r}: key store factory is not callable")
            if scheme in factories:
                raise PluginError(
                    f"plugin {current[0]!r}: key store scheme {scheme!r} is already registered"
                )
            factories[scheme] = factory
            owners[scheme] = current[0]

        owners: dict[str, str] = {}
        for impl in _impls(self.pm.hook.qimem_register_keystores):
            current[0] = impl.plugin_name
            _call_one(impl, "qimem_register_keystores", register=register)
        self._keystore_owners = owners
        return factories

    def keystore_plugin(self, scheme: str) -> str:
        """The name of the plugin that registered the key store ``scheme``."""
        self.keystores  # noqa: B018 - collects on first use
        return self._keystore_owners.get(scheme, "?")

    @cached_property
    def auth_providers(self) -> dict[str, Any]:
        """Provider name → provider, from ``qimem_register_auth_providers``."""
        providers: dict[str, Any] = {}
        current: list[str] = [""]

        def register(name: str, provider: Any) -> None:
            if not isinstance(name, str) or not name or name in providers:
                raise PluginError(f"plugin {current[0]!r}: bad or duplicate provider {name!r}")
            providers[name] = provider

        for impl in _impls(self.pm.hook.qimem_register_auth_providers):
            current[0] = impl.plugin_name
            _call_one(impl, "qimem_register_auth_providers", register=register)
        return providers

    @cached_property
    def root_key_providers(self) -> dict[str, Any]:
        """Provider name → factory (or a lazy reference to one), from
        ``qimem_register_root_key_providers``."""
        from qimem.root.provider import PROVIDER_NAME

        factories: dict[str, Any] = {}
        current: list[str] = [""]

        def register(name: str, factory: Any) -> None:
            if not isinstance(name, str) or not PROVIDER_NAME.match(name) or name in factories:
                raise PluginError(
                    f"plugin {current[0]!r}: bad or duplicate root-key provider {name!r}"
                )
            if references.is_reference(factory):
                factory = references.LazyFactory(factory, current[0])
            elif not callable(factory):
                raise PluginError(
                    f"plugin {current[0]!r}: root-key provider {name!r} is not callable"
                )
            factories[name] = factory
            self._root_provider_owners[name] = current[0]

        self._root_provider_owners: dict[str, str] = {}
        for impl in _impls(self.pm.hook.qimem_register_root_key_providers):
            current[0] = impl.plugin_name
            _call_one(impl, "qimem_register_root_key_providers", register=register)
        return factories

    def root_key_provider_plugin(self, name: str) -> str:
        """The name of the plugin that registered the root-key provider ``name``."""
        self.root_key_providers  # noqa: B018 - collects on first use
        return self._root_provider_owners.get(name, "?")

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Plugin name → the manifest it returned from ``qimem_plugin_manifest``."""
        result: dict[str, dict[str, Any]] = {}
        for impl in _impls(self.pm.hook.qimem_plugin_manifest):
            try:
                manifest = impl.function()
            except Exception as exc:
                raise PluginError(
                    f"plugin {impl.plugin_name!r} failed in qimem_plugin_manifest: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if manifest is None:
                continue
            if not isinstance(manifest, dict) or not isinstance(manifest.get("name"), str):
                raise PluginError(
                    f"plugin {impl.plugin_name!r} returned a malformed manifest "
                    "(a mapping with a 'name' is required)"
                )
            result[impl.plugin_name] = manifest
        return result

    def notify_key_event(self, event: KeyEvent) -> None:
        """Deliver a key event to every plugin; a failing plugin is logged, not fatal."""
        for impl in _impls(self.pm.hook.qimem_key_event):
            try:
                impl.function(*_args(impl, event=event))
            except Exception as exc:
                log.warning(
                    "plugin %r failed in qimem_key_event (%s): %s",
                    impl.plugin_name,
                    event.kind,
                    type(exc).__name__,
                )


def _is_builtin(plugin_name: str) -> bool:
    return plugin_name.startswith("qimem.builtin_plugins.")


def _impls(hook: Any) -> list[Any]:
    """A hook's implementations in collecting order: built-in plugins first, then the others
    in registration order, so a clash is blamed on the plugin that arrived second."""
    return sorted(hook.get_hookimpls(), key=lambda impl: not _is_builtin(impl.plugin_name))


def _args(impl: Any, **available: Any) -> list[Any]:
    """The arguments an implementation asked for (pluggy lets it take a subset of the spec)."""
    return [available[name] for name in impl.argnames]


def _call_one(impl: Any, hook_name: str, **available: Any) -> None:
    try:
        result = impl.function(*_args(impl, **available))
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(
            f"plugin {impl.plugin_name!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
        ) from exc
    if result is not None:
        raise PluginError(
            f"plugin {impl.plugin_name!r} returned a {type(result).__name__} from {hook_name}; "
            "it must call register(...) and return None"
        )
