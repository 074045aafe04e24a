"""Third-party plugins found through the ``qimem`` entry-point group.

Each test installs a real (tiny) distribution: an importable module plus a ``*.dist-info``
directory with ``METADATA`` and ``entry_points.txt`` in a temporary directory on
``sys.path``, so :mod:`importlib.metadata` finds it exactly as it finds pip-installed ones.
"""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from qimem import services
from qimem.app import AppContext
from qimem.cli import cli
from qimem.config import Config
from qimem.errors import PluginError
from qimem.registry import Registry, installed_plugins, make_plugin_manager

PLUGIN = "myplug"

ALGORITHM_PLUGIN = """
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from qimem.hooks import hookimpl


class Aes128Gcm:
    name = "aes-128-gcm"
    algorithm_id = 200
    key_size = 16
    nonce_size = 12
    tag_size = 16

    def generate_key(self):
        return bytearray(AESGCM.generate_key(bit_length=128))

    def cipher(self, key):
        return AESGCM(bytes(key))

    def encrypt(self, key, nonce, plaintext, aad=None):
        return AESGCM(bytes(key)).encrypt(nonce, plaintext, aad)

    def decrypt(self, key, nonce, ciphertext, aad=None):
        return AESGCM(bytes(key)).decrypt(nonce, ciphertext, aad)


@hookimpl
def qimem_register_algorithms(register):
    register(Aes128Gcm())


@hookimpl
def qimem_plugin_manifest():
    return {"name": "myplug", "version": "1.0", "description": "test",
            "provides": {"algorithms": ["aes-128-gcm"]}}
"""

Install = Callable[..., str]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(source, attr=None, name=PLUGIN)`` → the new module's name.

    The module gets a unique name per call so ``sys.modules`` never serves a stale copy.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def _install(source: str, attr: str | None = None, name: str = PLUGIN) -> str:
        module = f"qimem_test_plugin_{uuid.uuid4().hex[:10]}"
        created.append(module)
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        dist = site / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(
            f"[qimem]\n{name} = {module}{':' + attr if attr else ''}\n\n"
            "[console_scripts]\nnot-a-qimem-plugin = os:getcwd\n"
        )
        return module

    yield _install
    for module in created:
        sys.modules.pop(module, None)


def test_installed_plugins_lists_the_entry_point(install: Install) -> None:
    module = install(ALGORITHM_PLUGIN)
    assert installed_plugins()[PLUGIN] == module
    assert "not-a-qimem-plugin" not in installed_plugins()


def test_installed_but_not_enabled_is_not_loaded(install: Install) -> None:
    module = install(ALGORITHM_PLUGIN + "\nraise SystemExit('must never be imported')\n")
    pm = make_plugin_manager()
    assert pm.get_plugin(PLUGIN) is None
    assert module not in sys.modules  # its code never ran
    assert "aes-128-gcm" not in Registry(pm).algorithms


def test_enabled_plugin_is_loaded(install: Install) -> None:
    module = install(ALGORITHM_PLUGIN)
    pm = make_plugin_manager([PLUGIN])
    assert pm.get_plugin(PLUGIN) is sys.modules[module]
    registry = Registry(pm)
    assert registry.algorithms["aes-128-gcm"].algorithm_id == 200
    assert registry.manifests()[PLUGIN]["name"] == "myplug"
    # The built-ins are still there.
    assert {"aes-256-gcm", "chacha20-poly1305"} <= set(registry.algorithms)


def test_enabled_through_config_works_end_to_end(
    install: Install, sqlite_url: str, root_key_b64: str
) -> None:
    install(ALGORITHM_PLUGIN)
    config = Config(store_url=sqlite_url, root_key_b64=root_key_b64, plugins_enabled=[PLUGIN])
    with AppContext(config) as app:
        key = services.create_key(app, algorithm="aes-128-gcm", name="plugged")
        sealed = services.encrypt(app, "plugged", b"via entry point")
        assert services.decrypt(app, sealed.envelope).plaintext == b"via entry point"
        assert key.algorithm == "aes-128-gcm"


def test_enabled_entry_point_to_an_object(install: Install) -> None:
    source = ALGORITHM_PLUGIN + textwrap.dedent(
        """
        class _Plugin:
            qimem_register_algorithms = staticmethod(qimem_register_algorithms)

        plugin = _Plugin()
        """
    )
    module = install(source, attr="plugin")
    pm = make_plugin_manager([PLUGIN])
    assert pm.get_plugin(PLUGIN) is sys.modules[module].plugin
    assert "aes-128-gcm" in Registry(pm).algorithms


def test_enabled_but_missing_plugin_is_named(install: Install) -> None:
    install(ALGORITHM_PLUGIN)
    with pytest.raises(PluginError) as info:
        make_plugin_manager([PLUGIN, "ghost-plugin"])
    assert "'ghost-plugin'" in str(info.value)
    assert "not installed" in str(info.value)


def test_two_packages_claiming_one_name_are_refused(install: Install) -> None:
    first = install(ALGORITHM_PLUGIN)
    second = install(ALGORITHM_PLUGIN)
    with pytest.raises(PluginError) as info:
        make_plugin_manager([PLUGIN])
    message = str(info.value)
    assert message.startswith(f"plugin '{PLUGIN}' is provided by more than one installed package")
    assert first in message and second in message
    assert first not in sys.modules and second not in sys.modules  # neither was imported


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("import qimem_no_such_dependency_xyz\n", "ModuleNotFoundError"),
        ("raise RuntimeError('misconfigured')\n", "RuntimeError"),
        ("def broken(:\n", "SyntaxError"),
    ],
)
def test_plugin_failing_at_import_is_named(install: Install, source: str, problem: str) -> None:
    install(source)
    with pytest.raises(PluginError) as info:
        make_plugin_manager([PLUGIN])
    assert str(info.value).startswith(f"plugin '{PLUGIN}' failed to load")
    assert problem in str(info.value)


def test_entry_point_to_missing_attribute_is_named(install: Install) -> None:
    install(ALGORITHM_PLUGIN, attr="nothing_here")
    with pytest.raises(PluginError) as info:
        make_plugin_manager([PLUGIN])
    assert str(info.value).startswith(f"plugin '{PLUGIN}' failed to load")
    assert "AttributeError" in str(info.value)


def test_third_party_clash_with_builtin_blames_the_third_party(install: Install) -> None:
    install(ALGORITHM_PLUGIN.replace('"aes-128-gcm"', '"aes-256-gcm"', 1))
    registry = Registry(make_plugin_manager([PLUGIN]))
    with pytest.raises(PluginError) as info:
        registry.algorithms  # noqa: B018
    assert str(info.value).startswith(f"plugin '{PLUGIN}': ")
    assert "'aes-256-gcm' is already registered" in str(info.value)


def test_third_party_typo_hook_is_named(install: Install) -> None:
    install("from qimem.hooks import hookimpl\n\n@hookimpl\ndef qimem_typo(register):\n    pass\n")
    with pytest.raises(PluginError) as info:
        make_plugin_manager([PLUGIN])
    assert str(info.value).startswith(f"plugin '{PLUGIN}' implements unknown hook(s) qimem_typo")
    assert "<module" not in str(info.value)


# ------------------------------------------------------------------------- CLI


def run(*args: str, input: bytes | None = None) -> Result:  # noqa: A002
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def test_cli_plugin_flag_enables_it(install: Install, qimem_home: Path) -> None:
    install(ALGORITHM_PLUGIN)
    assert run("init").exit_code == 0

    without = run("keys", "create", "--algorithm", "aes-128-gcm")
    assert without.exit_code == 3
    assert "available: aes-256-gcm, chacha20-poly1305" in without.stderr

    created = run("--plugin", PLUGIN, "keys", "create", "--algorithm", "aes-128-gcm", "--json")
    assert created.exit_code == 0, created.stderr
    assert json.loads(created.stdout)["algorithm"] == "aes-128-gcm"
    key_id = json.loads(created.stdout)["key_id"]

    sealed = run("--plugin", PLUGIN, "encrypt", "--key", key_id, input=b"plugged in")
    assert sealed.exit_code == 0, sealed.stderr
    opened = run("--plugin", PLUGIN, "decrypt", input=sealed.stdout_bytes)
    assert opened.exit_code == 0, opened.stderr
    assert opened.stdout_bytes == b"plugged in"

    # Without the plugin the key's algorithm is unknown: a clear error, not a crash.
    # (Validation 3 or integrity 7, depending on the format; either way one clear line.)
    refused = run("decrypt", input=sealed.stdout_bytes)
    assert refused.exit_code in (3, 7), refused.stderr
    assert refused.stderr.startswith("qimem: error: ")
    assert "algorithm" in refused.stderr
    assert refused.stdout_bytes == b""
    assert "Traceback" not in refused.output


def test_cli_missing_plugin_flag_is_named(install: Install, qimem_home: Path) -> None:
    install(ALGORITHM_PLUGIN)
    run("init")
    result = run("--plugin", "ghost-plugin", "keys", "list")
    assert result.exit_code == 8
    assert result.stderr.strip() == (
        "qimem: error: plugin 'ghost-plugin' is enabled but not installed"
    )


def test_cli_config_enables_plugin(install: Install, qimem_home: Path) -> None:
    install(ALGORITHM_PLUGIN)
    init = run("--plugin", PLUGIN, "init")
    assert init.exit_code == 0, init.stderr
    written = tomllib.loads((qimem_home / "config.toml").read_text())
    assert written["plugins"]["enabled"] == [PLUGIN]
    created = run("keys", "create", "--algorithm", "aes-128-gcm", "--json")
    assert created.exit_code == 0, created.stderr
    assert json.loads(created.stdout)["algorithm"] == "aes-128-gcm"


def test_cli_broken_plugin_is_one_line_error(install: Install, qimem_home: Path) -> None:
    install("raise ImportError('needs libfoo')\n")
    run("init")
    result = run("--plugin", PLUGIN, "keys", "list")
    assert result.exit_code == 8
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"qimem: error: plugin '{PLUGIN}' failed to load")
    assert "Traceback" not in result.output
