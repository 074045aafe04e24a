"""Every hook is documented (datasette style), and the code in docs/plugins.md works."""

from __future__ import annotations

import json
import re
import sys
import textwrap
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest

from qimem import services
from qimem.app import AppContext
from qimem.config import Config
from qimem.registry import Registry, make_plugin_manager

DOC = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def _specs() -> dict[str, Any]:
    """Hook name → pluggy HookSpec, from a fresh manager (no plugins at all)."""
    pm = make_plugin_manager(builtins=())
    return {
        name: caller.spec
        for name, caller in vars(pm.hook).items()
        if getattr(caller, "spec", None) is not None
    }


def _blocks(language: str) -> list[str]:
    found = re.findall(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", DOC.read_text(), re.S | re.M)
    return [textwrap.dedent(block) for block in found]


def _block_starting(first_line: str) -> str:
    matches = [b for b in _blocks("python") if b.startswith(first_line)]
    assert len(matches) == 1, first_line
    return matches[0]


def _module_from(source: str, name: str, monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<docs/plugins.md:{name}>", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, name, module)
    return module


HOOKS = sorted(_specs())


def test_there_are_hooks() -> None:
    assert {
        "qimem_register_algorithms",
        "qimem_register_keystores",
        "qimem_register_auth_providers",
        "qimem_plugin_manifest",
        "qimem_key_event",
    } <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring(hook: str) -> None:
    doc = _specs()[hook].function.__doc__
    assert doc and doc.strip(), f"{hook} has no docstring"
    assert len(doc.strip().splitlines()[0]) > 10


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook: str) -> None:
    signature = f"{hook}({', '.join(_specs()[hook].argnames)})"
    headings = re.findall(r"^#+ +(.+?)\s*$", DOC.read_text(), re.M)
    assert signature in headings, f"docs/plugins.md needs a heading '### {signature}'"


def test_no_documented_hook_is_stale() -> None:
    documented = re.findall(r"^#+ +(qimem_\w+)\(", DOC.read_text(), re.M)
    assert sorted(documented) == HOOKS


def test_python_blocks_compile() -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for index, block in enumerate(blocks):
        compile(block, f"<docs/plugins.md python block {index}>", "exec")


def test_toml_blocks_parse_and_name_the_entry_point_group() -> None:
    docs = [tomllib.loads(block) for block in _blocks("toml")]
    project = next(d for d in docs if "project" in d)
    assert "qimem" in project["project"]["entry-points"]
    assert any(d.get("plugins", {}).get("enabled") for d in docs)


def test_documented_names_exist() -> None:
    from qimem.keystore import KeyStore
    from qimem.testing import KeyStoreContract

    assert callable(KeyStore) and callable(KeyStoreContract)
    text = DOC.read_text()
    assert "qimem.testing.KeyStoreContract" in text
    assert "`store` fixture" in text


def test_minimal_example_plugin_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _module_from(
        _block_starting("# qimem_example_audit.py"), "qimem_example_audit", monkeypatch
    )
    audit = tmp_path / "audit.jsonl"
    monkeypatch.setattr(module, "AUDIT_FILE", str(audit))
    pm = make_plugin_manager()
    pm.register(module, name="example-audit")
    pm.check_pending()
    with AppContext(Config(store_url="memory://"), pm=pm) as app:
        key = services.create_key(app, name="audited")
        rotated = services.rotate_key(app, "audited")
        assert Registry(pm).manifests()["example-audit"]["name"] == "example-audit"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["kind"], r["version"]) for r in records] == [("created", 1), ("rotated", 2)]
    assert records[1]["key_id"] == rotated.key_id
    assert records[1]["previous_key_id"] == key.key_id


def test_testing_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 'Registering in-process' test from the guide passes as written."""
    _module_from(_block_starting("# qimem_example_audit.py"), "qimem_example_audit", monkeypatch)
    namespace: dict[str, Any] = {}
    exec(_block_starting("import qimem_example_audit"), namespace)
    namespace["test_audit_sink"](tmp_path, monkeypatch)


def test_algorithm_example_works() -> None:
    block = _block_starting("from cryptography.hazmat.primitives.ciphers.aead import AESGCM")
    module = types.ModuleType("doc_aes128")
    exec(compile(block, "<docs/plugins.md:aes-128-gcm>", "exec"), module.__dict__)
    pm = make_plugin_manager()
    pm.register(module, name="doc-aes128")
    with AppContext(Config(store_url="memory://"), pm=pm) as app:
        services.create_key(app, algorithm="aes-128-gcm", name="legacy")
        sealed = services.encrypt(app, "legacy", b"documented", aad=b"a")
        assert services.decrypt(app, sealed.envelope, aad=b"a").plaintext == b"documented"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_tests(hook: str) -> None:
    """Some test module other than this one implements or calls the hook (datasette)."""
    here = Path(__file__).resolve()
    users = [
        path.name
        for path in here.parent.glob("test_*.py")
        if path != here and re.search(rf"\b{hook}\b", path.read_text("utf-8", "replace"))
    ]
    assert users, f"no test mentions {hook}"


# -- every hook has an implementation that the real code path calls ----------------------


def _count_calls(pm: Any) -> dict[str, list[str]]:
    """Wrap every registered implementation of every hook so a call is recorded (hook
    name → names of the plugins whose implementation ran); the implementations still run."""
    calls: dict[str, list[str]] = {name: [] for name in HOOKS}
    for name in HOOKS:
        for impl in getattr(pm.hook, name).get_hookimpls():
            original = impl.function

            def wrapper(
                *args: Any,
                _f: Any = original,
                _n: str = name,
                _p: str = impl.plugin_name,
                **kw: Any,
            ) -> Any:  # noqa: E501
                calls[_n].append(_p)
                return _f(*args, **kw)

            impl.function = wrapper
    return calls


def _login(app: AppContext) -> None:
    from identity_helpers import ADMIN_PASSWORD, fast_settings

    services.identity.configure(app, fast_settings())
    services.identity.bootstrap(app, ADMIN_PASSWORD)
    services.identity.token(
        app,
        "master",
        {"grant_type": "password", "username": "admin", "password": ADMIN_PASSWORD},
    )


#: For each hook: the real operation that must call it, and (for a hook no built-in plugin
#: implements) the documented example plugin that implements it. A new hook without an
#: entry fails :func:`test_every_hook_is_called_through_the_real_code_path`.
def _rotate_root(app: AppContext) -> None:
    """``qimem root rotate``: the configured provider (``env``) wraps a new root version."""
    from qimem.root.rotation import rotate

    assert rotate(app, settle=0.0).active == 2


REAL_PATHS: dict[str, tuple[Any, str | None]] = {
    "qimem_register_algorithms": (lambda app: services.create_key(app, name="h"), None),
    "qimem_register_keystores": (lambda app: app.store.list("master"), None),
    "qimem_register_auth_providers": (_login, None),
    "qimem_plugin_manifest": (lambda app: services.plugins.list_plugins(app), None),
    "qimem_key_event": (lambda app: services.create_key(app, name="e"), "# qimem_example_audit.py"),
    "qimem_register_root_key_providers": (_rotate_root, None),
}


def test_every_hook_has_a_real_path() -> None:
    assert sorted(REAL_PATHS) == HOOKS, "give each new hook a REAL_PATHS entry"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_called_through_the_real_code_path(
    hook: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook has at least one registered implementation (a built-in one, or the
    documented example), and the real operation calls it: a hook nothing implements, or
    that qimem never consults (as qimem_register_auth_providers once was), fails here."""
    operation, example = REAL_PATHS.get(hook, (None, None))
    assert operation is not None, f"{hook} has no REAL_PATHS entry"
    pm = make_plugin_manager()
    if example is not None:
        module = _module_from(_block_starting(example), f"hooked_{hook}", monkeypatch)
        monkeypatch.setattr(module, "AUDIT_FILE", str(tmp_path / "audit.jsonl"), raising=False)
        pm.register(module, name=f"example-{hook}")
    implementations = getattr(pm.hook, hook).get_hookimpls()
    assert implementations, f"no plugin implements {hook}"
    calls = _count_calls(pm)
    url = f"sqlite:///{tmp_path / 'q.db'}"
    from qimem.rootkey import encode_root_key, generate_root_key

    root_key = encode_root_key(generate_root_key())
    monkeypatch.setenv("QIMEM_ROOT_KEY", root_key)  # what the env root provider reads
    config = Config(store_url=url, root_key_b64=root_key)
    with AppContext(config, pm=pm) as app:
        operation(app)
        services.identity.close_identity(app)
    assert calls[hook], f"no implementation of {hook} was called by its real code path"


def test_auth_provider_example_logs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The login provider of docs/plugins.md, registered as written, in a realm's chain."""
    import hashlib

    from identity_helpers import ADMIN_PASSWORD, fast_settings

    from qimem.errors import AuthError
    from qimem.identity.providers import ProviderUnavailableError
    from qimem.services import auth_providers

    module = _module_from(
        _block_starting("# qimem_example_userfile.py"), "qimem_example_userfile", monkeypatch
    )
    users = tmp_path / "users"
    digest = hashlib.sha256(b"file-Pass-42").hexdigest()
    users.write_text(f"oscar:{digest}:ops,eng\n")
    pm = make_plugin_manager()
    pm.register(module, name="example-userfile")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    from qimem.rootkey import encode_root_key, generate_root_key

    root_key = encode_root_key(generate_root_key())
    monkeypatch.setenv("QIMEM_ROOT_KEY", root_key)  # what the env root provider reads
    config = Config(store_url=url, root_key_b64=root_key)
    with AppContext(config, pm=pm) as app:
        services.identity.configure(app, fast_settings())
        services.identity.bootstrap(app, ADMIN_PASSWORD)
        with pytest.raises(services.identity.ValidationError):
            auth_providers.set_realm_providers(
                app, "master", {"providers": ["userfile"], "userfile": {}}
            )
        auth_providers.set_realm_providers(
            app,
            "master",
            {
                "providers": ["password", "userfile"],
                "userfile": {"path": str(users)},
                "mapping": {"groups": {"ops": "admin"}, "jit_users": True},
            },
        )
        params = {"grant_type": "password", "username": "oscar", "password": "file-Pass-42"}
        token = services.identity.token(app, "master", params)
        assert services.identity.authenticate(app, token.access_token).roles == ("admin",)
        with pytest.raises(AuthError):
            services.identity.token(app, "master", {**params, "password": "wrong-Pass-1"})
        users.unlink()
        with pytest.raises(ProviderUnavailableError):
            services.identity.token(app, "master", params)
        services.identity.close_identity(app)
