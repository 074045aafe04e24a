"""The plugin registry: built-ins through hooks, inline plugins on a fresh manager, and
plugins that raise or hand over garbage (each error names the plugin at fault)."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import pluggy
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem import services
from qimem.app import AppContext
from qimem.config import Config
from qimem.crypto import Algorithm
from qimem.errors import DecryptionError, PluginError, UnsupportedAlgorithmError
from qimem.events import KeyEvent
from qimem.hooks import hookimpl
from qimem.registry import DEFAULT_PLUGINS, Registry, make_plugin_manager


class Aes128Gcm:
    """A real third-party-style algorithm: AES-128-GCM over cryptography's AESGCM."""

    name = "aes-128-gcm"
    algorithm_id = 200
    key_size = 16
    nonce_size = 12
    tag_size = 16

    def generate_key(self) -> bytearray:
        return bytearray(AESGCM.generate_key(bit_length=128))

    def cipher(self, key: bytes | bytearray) -> AESGCM:
        return AESGCM(bytes(key))

    def encrypt(
        self, key: bytes, nonce: bytes, plaintext: bytes, aad: bytes | None = None
    ) -> bytes:
        return AESGCM(bytes(key)).encrypt(nonce, plaintext, aad)

    def decrypt(
        self, key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes | None = None
    ) -> bytes:
        return AESGCM(bytes(key)).decrypt(nonce, ciphertext, aad)


def algorithm_plugin(*algorithms: Any) -> object:
    class Plugin:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> None:
            for algorithm in algorithms:
                register(algorithm)

    return Plugin()


def with_plugin(plugin: object, name: str) -> pluggy.PluginManager:
    pm = make_plugin_manager()
    pm.register(plugin, name=name)
    return pm


@pytest.fixture
def sqlite_config(sqlite_url: str, root_key_b64: str) -> Config:
    return Config(store_url=sqlite_url, root_key_b64=root_key_b64)


# ------------------------------------------------------------------------ built-ins


def test_builtins_are_registered_through_hooks() -> None:
    pm = make_plugin_manager()
    assert {name for name, _ in pm.list_name_plugin()} >= set(DEFAULT_PLUGINS)
    registry = Registry(pm)
    assert sorted(registry.algorithms) == ["aes-256-gcm", "chacha20-poly1305"]
    assert {a.algorithm_id for a in registry.algorithms.values()} == {1, 2}
    assert set(registry.keystores) >= {"memory", "sqlite", "postgresql+psycopg"}
    for algorithm in registry.algorithms.values():
        assert isinstance(algorithm, Algorithm)
    # Each built-in algorithm comes from the hookimpl of its own built-in module.
    impls = pm.hook.qimem_register_algorithms.get_hookimpls()
    assert sorted(i.plugin_name for i in impls) == [
        "qimem.builtin_plugins.aes_gcm",
        "qimem.builtin_plugins.chacha20",
        "qimem.builtin_plugins.key_purposes",  # the other purposes (plugin API 1.2)
    ]


def test_builtins_describe_themselves() -> None:
    manifests = Registry(make_plugin_manager()).manifests()
    assert set(manifests) == set(DEFAULT_PLUGINS)
    provided = {
        name
        for manifest in manifests.values()
        for names in manifest["provides"].values()
        for name in names
    }
    assert {"aes-256-gcm", "chacha20-poly1305", "memory", "sqlite"} <= provided


def test_no_builtins_means_no_algorithms() -> None:
    registry = Registry(make_plugin_manager(builtins=()))
    assert registry.algorithms == {}
    with pytest.raises(UnsupportedAlgorithmError, match=r"available: \)"):
        registry.algorithm("aes-256-gcm")


def test_unknown_algorithm_lists_available() -> None:
    registry = Registry(make_plugin_manager())
    with pytest.raises(UnsupportedAlgorithmError) as info:
        registry.algorithm("rot13")
    assert "rot13" in str(info.value)
    assert "aes-256-gcm, chacha20-poly1305" in str(info.value)
    with pytest.raises(UnsupportedAlgorithmError, match="99"):
        registry.algorithm_by_id(99)


def test_fresh_managers_are_independent() -> None:
    extended = with_plugin(algorithm_plugin(Aes128Gcm()), "extra")
    assert "aes-128-gcm" in Registry(extended).algorithms
    assert "aes-128-gcm" not in Registry(make_plugin_manager()).algorithms


# ----------------------------------------------------------- a working plugin


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_inline_algorithm_plugin_works_end_to_end(
    store: str, sqlite_config: Config, root_key_b64: str
) -> None:
    pm = with_plugin(algorithm_plugin(Aes128Gcm()), "aes128-plugin")
    config = sqlite_config if store == "sqlite" else Config(store_url="memory://")
    with AppContext(config, pm=pm) as app:
        key = services.create_key(app, algorithm="aes-128-gcm", name="small")
        assert key.algorithm == "aes-128-gcm"
        assert len(app.store.material(key.realm, key.key_id)) == 16
        sealed = services.encrypt(app, "small", b"through a plugin", aad=b"ctx")
        assert sealed.envelope[:16] != b"through a plugin"[:16]
        opened = services.decrypt(app, sealed.envelope, aad=b"ctx")
        assert opened.plaintext == b"through a plugin"
        assert opened.key_id == key.key_id
        with pytest.raises(DecryptionError):
            services.decrypt(app, sealed.envelope, aad=b"other")

        rotated = services.rotate_key(app, "small")
        assert rotated.algorithm == "aes-128-gcm" and rotated.version == 2
        assert services.decrypt(app, sealed.envelope, aad=b"ctx").plaintext == b"through a plugin"

    if store == "sqlite":
        # Without the plugin, the key's algorithm is refused clearly (not a crash).
        plain = AppContext(config)
        with plain, pytest.raises(UnsupportedAlgorithmError, match="aes-128-gcm"):
            services.decrypt(plain, sealed.envelope, aad=b"ctx")


def test_hookimpl_may_take_fewer_arguments() -> None:
    seen: list[str] = []

    class Observer:
        @hookimpl
        def qimem_key_event(self) -> None:  # opts out of the event argument
            seen.append("called")

    pm = with_plugin(Observer(), "observer")
    with AppContext(Config(store_url="memory://"), pm=pm) as app:
        services.create_key(app)
    assert seen == ["called"]


# ------------------------------------------------------ plugins that misbehave


def test_duplicate_algorithm_name_names_the_plugin() -> None:
    clash = Aes128Gcm()
    clash.name = "aes-256-gcm"  # type: ignore[misc]
    pm = with_plugin(algorithm_plugin(clash), "copycat")
    with pytest.raises(PluginError) as info:
        Registry(pm).algorithms  # noqa: B018
    assert "'copycat'" in str(info.value)
    assert "'aes-256-gcm' is already registered" in str(info.value)


def test_duplicate_algorithm_id_names_the_plugin() -> None:
    clash = Aes128Gcm()
    clash.algorithm_id = 2  # type: ignore[misc]
    pm = with_plugin(algorithm_plugin(clash), "id-thief")
    with pytest.raises(PluginError) as info:
        Registry(pm).algorithms  # noqa: B018
    assert "'id-thief'" in str(info.value)
    assert "id 2 is already used by 'chacha20-poly1305'" in str(info.value)


def test_duplicate_within_one_plugin() -> None:
    pm = with_plugin(algorithm_plugin(Aes128Gcm(), Aes128Gcm()), "twice")
    with pytest.raises(PluginError, match="'twice'.*already registered"):
        Registry(pm).algorithms  # noqa: B018


def test_raising_hook_names_the_plugin() -> None:
    class Broken:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> None:
            raise RuntimeError("backend library missing")

    pm = with_plugin(Broken(), "broken-plugin")
    with pytest.raises(PluginError) as info:
        Registry(pm).algorithms  # noqa: B018
    message = str(info.value)
    assert "'broken-plugin'" in message
    assert "qimem_register_algorithms" in message
    assert "RuntimeError" in message


def test_raising_hook_surfaces_through_services() -> None:
    class Broken:
        @hookimpl
        def qimem_register_keystores(self, register: Any) -> None:
            raise ValueError("nope")

    pm = with_plugin(Broken(), "bad-store-plugin")
    app = AppContext(Config(store_url="memory://"), pm=pm)
    with pytest.raises(PluginError, match="'bad-store-plugin'"):
        services.list_keys(app)


def test_returning_instead_of_registering_is_an_error() -> None:
    class Returner:
        @hookimpl
        def qimem_register_algorithms(self, register: Any) -> list[Any]:
            return [Aes128Gcm()]

    pm = with_plugin(Returner(), "returner")
    with pytest.raises(PluginError, match="'returner' returned a list.*register"):
        Registry(pm).algorithms  # noqa: B018


class _Fields:
    """An algorithm-like object built from keyword fields."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


_GOOD = {
    "name": "good-algo",
    "algorithm_id": 201,
    "key_size": 32,
    "nonce_size": 12,
    "tag_size": 16,
    "generate_key": lambda: bytearray(32),
    "cipher": lambda key: None,
    "encrypt": lambda *a: b"",
    "decrypt": lambda *a: b"",
}


def _malformed(**changes: Any) -> _Fields:
    fields = {**_GOOD, **changes}
    return _Fields(**{k: v for k, v in fields.items() if v is not _MISSING})


_MISSING = object()


@pytest.mark.parametrize(
    ("offered", "problem"),
    [
        ("aes-256-gcm", "algorithm name None"),  # a string, not an algorithm
        (None, "algorithm name None"),
        (_malformed(name=_MISSING), "algorithm name None"),
        (_malformed(name="Upper-Case"), "'Upper-Case' is not a lowercase name"),
        (_malformed(name=42), "algorithm name 42"),
        (_malformed(algorithm_id=_MISSING), "algorithm_id must be an integer"),
        (_malformed(algorithm_id="7"), "algorithm_id must be an integer"),
        (_malformed(algorithm_id=0), "algorithm_id must be an integer in 1..255"),
        (_malformed(algorithm_id=256), "algorithm_id must be an integer in 1..255"),
        (_malformed(key_size=32.0), "key_size must be an integer"),
        (_malformed(key_size=True), "key_size must be an integer"),
        (_malformed(key_size=8), "key_size must be an integer in 16..64"),
        (_malformed(nonce_size=_MISSING), "nonce_size must be an integer"),
        (_malformed(tag_size=4), "tag_size must be an integer in 12..32"),
        (_malformed(generate_key=_MISSING), "has no generate_key() method"),
        (_malformed(cipher="not callable"), "has no cipher() method"),
        (_malformed(encrypt=None), "has no encrypt() method"),
        (_malformed(decrypt=_MISSING), "has no decrypt() method"),
    ],
)
def test_malformed_algorithm_names_plugin_and_problem(offered: Any, problem: str) -> None:
    pm = with_plugin(algorithm_plugin(offered), "sloppy")
    with pytest.raises(PluginError) as info:
        Registry(pm).algorithms  # noqa: B018
    assert str(info.value).startswith("plugin 'sloppy': ")
    assert problem in str(info.value)


def test_wellformed_fields_object_is_accepted() -> None:
    pm = with_plugin(algorithm_plugin(_malformed()), "fine")
    assert "good-algo" in Registry(pm).algorithms


@pytest.mark.parametrize(
    ("scheme", "factory", "problem"),
    [
        ("Bad Scheme", lambda url, wrapper: None, "bad key store scheme"),
        (None, lambda url, wrapper: None, "bad key store scheme"),
        ("custom", "not-callable", "not callable"),
        ("sqlite", lambda url, wrapper: None, "'sqlite' is already registered"),
    ],
)
def test_malformed_keystore_registration(scheme: Any, factory: Any, problem: str) -> None:
    class Stores:
        @hookimpl
        def qimem_register_keystores(self, register: Any) -> None:
            register(scheme, factory)

    pm = with_plugin(Stores(), "store-plugin")
    with pytest.raises(PluginError) as info:
        Registry(pm).keystores  # noqa: B018
    assert "'store-plugin'" in str(info.value)
    assert problem in str(info.value)


def test_duplicate_auth_provider() -> None:
    class Auth:
        @hookimpl
        def qimem_register_auth_providers(self, register: Any) -> None:
            register("ldap", object())
            register("ldap", object())

    pm = with_plugin(Auth(), "auth-plugin")
    with pytest.raises(PluginError, match="'auth-plugin'.*'ldap'"):
        Registry(pm).auth_providers  # noqa: B018


@pytest.mark.parametrize("manifest", [["a", "list"], {"version": "1"}, {"name": 3}])
def test_malformed_manifest_names_plugin(manifest: Any) -> None:
    class Described:
        @hookimpl
        def qimem_plugin_manifest(self) -> Any:
            return manifest

    pm = with_plugin(Described(), "described")
    with pytest.raises(PluginError, match="'described' returned a malformed manifest"):
        Registry(pm).manifests()


def test_raising_manifest_names_plugin() -> None:
    class Described:
        @hookimpl
        def qimem_plugin_manifest(self) -> Any:
            raise KeyError("version")

    pm = with_plugin(Described(), "described")
    with pytest.raises(PluginError, match="'described' failed in qimem_plugin_manifest"):
        Registry(pm).manifests()


@pytest.fixture
def typo_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module with a misspelled hook implementation."""
    module = types.ModuleType("qimem_test_typo_plugin")

    @hookimpl
    def qimem_typo(register: Any) -> None:
        """Misspelled: there is no such hook."""

    module.qimem_typo = qimem_typo  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    yield module.__name__


def test_unknown_hookimpl_is_a_plugin_error(typo_module: str) -> None:
    with pytest.raises(PluginError) as info:
        make_plugin_manager(builtins=(*DEFAULT_PLUGINS, typo_module))
    assert typo_module in str(info.value)
    assert "qimem_typo" in str(info.value)


def test_unknown_hookimpl_on_an_inline_class() -> None:
    class Typo:
        @hookimpl
        def qimem_register_algorithm(self, register: Any) -> None:  # missing "s"
            """Misspelled."""

    pm = with_plugin(Typo(), "typo-class")
    with pytest.raises(pluggy.PluginValidationError, match="qimem_register_algorithm"):
        pm.check_pending()


def test_wrong_hook_arguments_are_refused_at_registration() -> None:
    class WrongArgs:
        @hookimpl
        def qimem_register_algorithms(self, register: Any, extra: Any) -> None:
            """Asks for an argument the spec does not have."""

    pm = make_plugin_manager()
    with pytest.raises(pluggy.PluginValidationError, match="extra"):
        pm.register(WrongArgs(), name="wrong-args")


# ------------------------------------------------------------------ key events


class Recorder:
    def __init__(self) -> None:
        self.events: list[KeyEvent] = []

    @hookimpl
    def qimem_key_event(self, event: KeyEvent) -> None:
        self.events.append(event)


class Exploder:
    @hookimpl
    def qimem_key_event(self, event: KeyEvent) -> None:
        raise RuntimeError("audit sink is down")


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_key_events_are_delivered_without_material(store: str, sqlite_config: Config) -> None:
    recorder = Recorder()
    pm = with_plugin(recorder, "recorder")
    config = sqlite_config if store == "sqlite" else Config(store_url="memory://")
    with AppContext(config, pm=pm) as app:
        first = services.create_key(app, name="audited")
        material_v1 = bytes(app.store.material(first.realm, first.key_id))
        second = services.rotate_key(app, "audited")
        material_v2 = bytes(app.store.material(second.realm, second.key_id))

    assert [e.kind for e in recorder.events] == ["created", "rotated"]
    created, rotated = recorder.events
    assert created.key == first and created.previous is None and created.realm == "master"
    assert rotated.key == second and rotated.previous is not None
    assert rotated.previous.key_id == first.key_id
    for event in recorder.events:
        text = repr(event) + repr(vars(event))
        for material in (material_v1, material_v2):
            assert material.hex() not in text
            assert repr(material) not in text
        assert not any(isinstance(v, bytes | bytearray) for v in vars(event).values())
        assert not any(isinstance(v, bytes | bytearray) for v in vars(event.key).values())


def test_raising_event_plugin_does_not_break_rotation(
    sqlite_config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    pm = make_plugin_manager()
    pm.register(recorder, name="recorder")
    pm.register(Exploder(), name="exploder")
    with AppContext(sqlite_config, pm=pm) as app:
        with caplog.at_level(logging.WARNING, logger="qimem.registry"):
            services.create_key(app, name="sturdy")
            sealed = services.encrypt(app, "sturdy", b"before rotation")
            rotated = services.rotate_key(app, "sturdy")
        assert rotated.version == 2
        details = services.show_key(app, "sturdy")
        assert [v.state.value for v in details.versions] == ["decrypt-only", "active"]
        assert services.encrypt(app, "sturdy", b"after").key_id == rotated.key_id
        assert services.decrypt(app, sealed.envelope).plaintext == b"before rotation"
    # The well-behaved plugin still saw both events, and the failure was logged by name.
    assert [e.kind for e in recorder.events] == ["created", "rotated"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("'exploder'" in m and "rotated" in m for m in messages), messages
    assert any("'exploder'" in m and "created" in m for m in messages), messages


def test_event_failure_does_not_leak_the_exception_text(caplog: pytest.LogCaptureFixture) -> None:
    class Leaky:
        @hookimpl
        def qimem_key_event(self, event: KeyEvent) -> None:
            raise RuntimeError("password=hunter2")

    pm = with_plugin(Leaky(), "leaky")
    app = AppContext(Config(store_url="memory://"), pm=pm)
    with app, caplog.at_level(logging.DEBUG, logger="qimem.registry"):
        services.create_key(app)
    assert "hunter2" not in caplog.text
    assert "'leaky'" in caplog.text


# ------------------------------------------------------- key store factories


def _store_plugin(factory: Any) -> object:
    class Stores:
        @hookimpl
        def qimem_register_keystores(self, register: Any) -> None:
            register("custom", factory)

    return Stores()


def test_store_factory_that_raises_is_named(root_key_b64: str) -> None:
    def factory(url: str, wrapper: Any) -> Any:
        raise OSError(f"cannot reach {url} with password hunter2")

    pm = with_plugin(_store_plugin(factory), "custom-store")
    app = AppContext(Config(store_url="custom://u:pw@host/db", root_key_b64=root_key_b64), pm=pm)
    with pytest.raises(PluginError) as info:
        services.list_keys(app)
    message = str(info.value)
    assert message == "plugin 'custom-store' failed to open the 'custom' key store (OSError)"
    assert "hunter2" not in message


def test_store_factory_returning_garbage_is_named(root_key_b64: str) -> None:
    pm = with_plugin(_store_plugin(lambda url, wrapper: {"not": "a store"}), "custom-store")
    app = AppContext(Config(store_url="custom://x", root_key_b64=root_key_b64), pm=pm)
    with pytest.raises(PluginError, match="'custom-store'.*returned a dict, not a"):
        services.list_keys(app)


def test_store_factory_gets_url_and_wrapper(root_key_b64: str) -> None:
    from qimem.builtin_plugins.memory_keystore import InMemoryKeyStore
    from qimem.rootkey import KeyWrapper

    calls: list[tuple[str, Any]] = []

    def factory(url: str, wrapper: Any) -> InMemoryKeyStore:
        calls.append((url, wrapper))
        return InMemoryKeyStore()

    pm = with_plugin(_store_plugin(factory), "custom-store")
    config = Config(store_url="custom://somewhere/db", root_key_b64=root_key_b64)
    with AppContext(config, pm=pm) as app:
        key = services.create_key(app, name="in-custom")
        assert services.show_key(app, "in-custom").lineage_id == key.lineage_id
    assert len(calls) == 1
    assert calls[0][0] == "custom://somewhere/db"
    assert isinstance(calls[0][1], KeyWrapper)
