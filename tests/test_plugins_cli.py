"""``qimem plugins list|show|enable|disable|register|remove`` on a real SQLite store, with
plugin packages installed on a temporary sys.path entry (real dist-info metadata, entry
points and manifest files, found by importlib.metadata exactly as pip-installed ones)."""

from __future__ import annotations

import json
import sys
import textwrap
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from qimem.cli import cli
from qimem.manifest import MANIFEST_FILENAME, PLUGIN_API

ALGORITHM_PLUGIN = """
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from qimem.errors import DecryptionError
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
        try:
            return AESGCM(bytes(key)).decrypt(nonce, ciphertext, aad)
        except Exception:
            raise DecryptionError("ciphertext failed authentication") from None


@hookimpl
def qimem_register_algorithms(register):
    register(Aes128Gcm())
"""


def manifest_toml(name: str, *, api: str = ">=1,<2", version: str = "1.0.0") -> str:
    return textwrap.dedent(
        f"""\
        name = "{name}"
        version = "{version}"
        description = "A test plugin"
        qimem_api = "{api}"

        [provides]
        algorithms = ["aes-128-gcm"]
        """
    )


Install = Callable[..., str]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(name, source, manifest=None, record=True)`` → the new package's name.

    Writes a package (``__init__.py`` + optional ``qimem_plugin.toml``) and its dist-info
    (METADATA, entry_points.txt, and RECORD unless ``record=False``, which is what an
    editable install looks like to importlib.metadata).
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    created: list[str] = []

    def _install(
        name: str, source: str, manifest: str | None = None, *, record: bool = True
    ) -> str:
        package = f"qimem_test_pkg_{uuid.uuid4().hex[:10]}"
        created.append(package)
        folder = site / package
        folder.mkdir()
        (folder / "__init__.py").write_text(textwrap.dedent(source))
        files = [f"{package}/__init__.py"]
        if manifest is not None:
            (folder / MANIFEST_FILENAME).write_text(manifest)
            files.append(f"{package}/{MANIFEST_FILENAME}")
        dist = site / f"{package}-2.5.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 2.5\n"
        )
        (dist / "entry_points.txt").write_text(f"[qimem]\n{name} = {package}\n")
        if record:
            (dist / "RECORD").write_text("".join(f"{f},,\n" for f in files))
        return package

    yield _install
    for package in created:
        for module in [m for m in sys.modules if m.split(".")[0] == package]:
            del sys.modules[module]


def run(*args: str, input: bytes | None = None) -> Result:  # noqa: A002
    return CliRunner().invoke(cli, list(args), input=input, catch_exceptions=False)


def listing(*flags: str) -> dict[str, dict[str, Any]]:
    result = run(*flags, "plugins", "list", "--json")
    assert result.exit_code == 0, result.stderr
    return {p["name"]: p for p in json.loads(result.stdout)}


@pytest.fixture
def home(qimem_home: Path) -> Path:
    assert run("init").exit_code == 0
    return qimem_home


def enabled_in_config(home: Path) -> list[str]:
    return list(tomllib.loads((home / "config.toml").read_text())["plugins"]["enabled"])


BUILTINS = {
    "aes-256-gcm",
    "chacha20-poly1305",
    "memory-keystore",
    "sql-keystore",
    "key-purposes",  # signing, MAC and deterministic algorithms (issue 16)
    "password-auth",
    "ldap-auth",
    "jwt-auth",
    "root-file",
    "root-pkcs11",
    "root-qimem",
}


# ---------------------------------------------------------------------- list/show


def test_list_shows_builtins_everywhere(home: Path) -> None:
    plugins = listing()
    assert set(plugins) == BUILTINS
    for info in plugins.values():
        assert info["builtin"] and info["installed"] and info["enabled"] and info["loaded"]
        assert info["compatible"] is True and info["reason"] is None and not info["problems"]
        assert info["manifest"]["qimem_api"] == ">=1,<2"
    assert plugins["aes-256-gcm"]["module"] == "qimem.builtin_plugins.aes_gcm"
    table = run("plugins", "list")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "VERSION",
        "KIND",
        "INSTALLED",
        "ENABLED",
        "LOADED",
        "COMPATIBLE",
        "REASON",
    ]
    assert any(line.split()[:3] == ["sql-keystore", "1.0.0", "built-in"] for line in lines)


def test_show_builtin_by_name_and_module(home: Path) -> None:
    shown = run("plugins", "show", "chacha20-poly1305", "--json")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["manifest"]["provides"]["algorithms"] == ["chacha20-poly1305"]
    by_module = run("plugins", "show", "qimem.builtin_plugins.chacha20", "--json")
    assert json.loads(by_module.stdout)["name"] == "chacha20-poly1305"
    text = run("plugins", "show", "aes-256-gcm")
    assert "qimem_api     >=1,<2" in text.stdout and "algorithms    aes-256-gcm" in text.stdout


def test_show_unknown_is_not_found(home: Path) -> None:
    result = run("plugins", "show", "ghost")
    assert result.exit_code == 5
    assert result.stderr.strip() == "qimem: error: no plugin 'ghost'"


def test_installed_not_enabled_shows_manifest_without_importing(
    home: Path, install: Install
) -> None:
    package = install(
        "tripwire",
        "raise SystemExit('must never be imported')\n",
        manifest_toml("tripwire"),
    )
    info = listing()["tripwire"]
    assert package not in sys.modules
    assert info["installed"] and not info["enabled"] and not info["loaded"]
    assert info["compatible"] is True
    assert info["reason"] == (
        "not enabled (run 'qimem plugins enable tripwire' or pass --plugin tripwire)"
    )
    assert info["manifest"]["description"] == "A test plugin"
    assert info["module"] == package
    assert info["distribution"] == f"{package.replace('_', '-')} 2.5"


def test_manifest_found_without_record_as_in_editable_installs(
    home: Path, install: Install
) -> None:
    package = install(
        "editable", "raise SystemExit('no')\n", manifest_toml("editable"), record=False
    )
    info = listing()["editable"]
    assert package not in sys.modules
    assert info["manifest"]["name"] == "editable" and info["compatible"] is True


def test_installed_incompatible_is_flagged_without_importing(home: Path, install: Install) -> None:
    package = install("future", "raise SystemExit('no')\n", manifest_toml("future", api=">=2"))
    info = listing()["future"]
    assert package not in sys.modules
    assert info["compatible"] is False
    assert info["reason"] == (
        "plugin 'future' is not compatible with this qimem: it requires qimem plugin API "
        f"'>=2', and this qimem provides plugin API {PLUGIN_API}"
    )


def test_invalid_shipped_manifest_is_a_problem(home: Path, install: Install) -> None:
    install("sloppy", ALGORITHM_PLUGIN, 'name = "sloppy"\nversion = 3\n')
    info = listing()["sloppy"]
    assert info["compatible"] is None
    assert any("field 'version' must be a string" in p for p in info["problems"])
    assert any("field 'qimem_api' is required" in p for p in info["problems"])


# ------------------------------------------------------------------ enable/disable


def test_enable_then_use_then_disable(home: Path, install: Install) -> None:
    install("aes128", ALGORITHM_PLUGIN, manifest_toml("aes128"))
    config_before = tomllib.loads((home / "config.toml").read_text())

    enabled = run("plugins", "enable", "aes128", "--json")
    assert enabled.exit_code == 0, enabled.stderr
    info = json.loads(enabled.stdout)
    assert info["enabled"] and info["loaded"] and info["reason"] is None
    assert enabled_in_config(home) == ["aes128"]
    config_after = tomllib.loads((home / "config.toml").read_text())
    assert {k: v for k, v in config_after.items() if k != "plugins"} == {
        k: v for k, v in config_before.items() if k != "plugins"
    }
    assert (home / "config.toml").stat().st_mode & 0o777 == 0o600

    assert run("plugins", "enable", "aes128").exit_code == 0  # idempotent
    assert enabled_in_config(home) == ["aes128"]
    created = run("keys", "create", "--algorithm", "aes-128-gcm", "--json")
    assert created.exit_code == 0, created.stderr
    assert listing()["aes128"]["loaded"] is True

    disabled = run("plugins", "disable", "aes128")
    assert disabled.exit_code == 0 and disabled.stdout.strip() == "disabled aes128"
    assert enabled_in_config(home) == []
    after = listing()["aes128"]
    assert after["installed"] and not after["enabled"] and not after["loaded"]
    assert run("plugins", "disable", "aes128").exit_code == 0  # idempotent
    refused = run("keys", "create", "--algorithm", "aes-128-gcm")
    assert refused.exit_code == 3


def test_enable_not_installed(home: Path) -> None:
    result = run("plugins", "enable", "ghost")
    assert result.exit_code == 5
    assert "plugin 'ghost' is not installed" in result.stderr
    assert enabled_in_config(home) == []


def test_builtins_cannot_be_enabled_disabled_or_removed(home: Path) -> None:
    for command in ("enable", "disable", "remove"):
        result = run("plugins", command, "aes-256-gcm")
        assert result.exit_code == 6, (command, result.stderr)
        assert "built-in plugin 'aes-256-gcm'" in result.stderr


def test_enable_incompatible_is_refused_before_import(home: Path, install: Install) -> None:
    package = install(
        "future", "raise SystemExit('never')\n", manifest_toml("future", api=">=2,<3")
    )
    result = run("plugins", "enable", "future")
    assert result.exit_code == 8
    assert result.stderr.strip() == (
        "qimem: error: plugin 'future' is not compatible with this qimem: it requires qimem "
        f"plugin API '>=2,<3', and this qimem provides plugin API {PLUGIN_API}"
    )
    assert package not in sys.modules
    assert enabled_in_config(home) == []


def test_enable_incompatible_by_hook_manifest(home: Path, install: Install) -> None:
    source = ALGORITHM_PLUGIN + textwrap.dedent(
        """
        @hookimpl
        def qimem_plugin_manifest():
            return {"name": "oldie", "version": "0.1", "description": "old",
                    "qimem_api": "<1", "provides": {}}
        """
    )
    install("oldie", source)  # no manifest file: only the hook says it
    result = run("plugins", "enable", "oldie")
    assert result.exit_code == 8
    assert "plugin 'oldie' is not compatible" in result.stderr and "'<1'" in result.stderr
    assert enabled_in_config(home) == []
    # Forced with --plugin, it is refused the same way at load time.
    forced = run("--plugin", "oldie", "keys", "list")
    assert forced.exit_code == 8 and "plugin 'oldie' is not compatible" in forced.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("raise ImportError('needs libfoo')\n", "plugin 'broken' failed to load: ImportError"),
        (
            "from qimem.hooks import hookimpl\n@hookimpl\ndef qimem_typo():\n    pass\n",
            "plugin 'broken' implements unknown hook(s) qimem_typo",
        ),
        (
            "from qimem.hooks import hookimpl\n@hookimpl\n"
            "def qimem_register_algorithms(register):\n    raise RuntimeError('boom')\n",
            "plugin 'broken' failed in qimem_register_algorithms: RuntimeError: boom",
        ),
        (
            ALGORITHM_PLUGIN.replace('"aes-128-gcm"', '"aes-256-gcm"', 1),
            "plugin 'broken': algorithm 'aes-256-gcm' is already registered",
        ),
    ],
)
def test_enable_broken_plugin_is_refused_and_named(
    home: Path, install: Install, source: str, expected: str
) -> None:
    install("broken", source)
    result = run("plugins", "enable", "broken")
    assert result.exit_code == 8
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qimem: error: {expected}")
    assert "Traceback" not in result.output
    assert enabled_in_config(home) == []


def test_enable_without_config_file(qimem_home: Path, install: Install) -> None:
    install("aes128", ALGORITHM_PLUGIN)
    result = run("--store", "memory://", "plugins", "enable", "aes128")
    assert result.exit_code == 9
    assert "no config file to record enabled plugins in" in result.stderr


# ----------------------------------------------------------------------- isolation


def _enable_in_config(home: Path, *names: str) -> None:
    path = home / "config.toml"
    text = path.read_text().replace("enabled = []", f"enabled = {json.dumps(list(names))}")
    path.write_text(text)
    assert enabled_in_config(home) == list(names)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("raise RuntimeError('misconfigured')\n", "plugin 'bad' failed to load: RuntimeError"),
        (
            "from qimem.hooks import hookimpl\n@hookimpl\n"
            "def qimem_register_keystores(register):\n    raise ValueError('nope')\n",
            "plugin 'bad' failed in qimem_register_keystores: ValueError: nope",
        ),
        (
            "from qimem.hooks import hookimpl\n@hookimpl\n"
            "def qimem_plugin_manifest():\n    raise KeyError('version')\n",
            "plugin 'bad' failed in qimem_plugin_manifest: KeyError",
        ),
    ],
)
def test_broken_enabled_plugin_is_isolated_in_listing(
    home: Path, install: Install, source: str, reason: str
) -> None:
    install("good", ALGORITHM_PLUGIN, manifest_toml("good"))
    install("bad", source)
    _enable_in_config(home, "good", "bad", "ghost")
    plugins = listing()
    assert plugins["good"]["loaded"] is True and plugins["good"]["reason"] is None
    assert plugins["bad"]["enabled"] and not plugins["bad"]["loaded"]
    assert plugins["bad"]["reason"].startswith(reason)
    assert plugins["ghost"]["reason"] == "plugin 'ghost' is enabled but not installed"
    assert not plugins["ghost"]["installed"]
    for name in BUILTINS:
        assert plugins[name]["loaded"] is True
    shown = run("plugins", "show", "bad", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["reason"].startswith(reason)
    # Disabling the broken one is possible without touching the others.
    assert run("plugins", "disable", "bad").exit_code == 0
    assert enabled_in_config(home) == ["good", "ghost"]


# -------------------------------------------------------------- register/remove


def test_register_list_remove_persist_in_the_store(
    home: Path, install: Install, tmp_path: Path
) -> None:
    path = tmp_path / "siv.toml"
    path.write_text(manifest_toml("siv-plugin", version="3.1.0"))
    registered = run("plugins", "register", str(path))
    assert registered.exit_code == 0, registered.stderr
    assert registered.stdout.strip() == "registered siv-plugin 3.1.0"

    info = listing()["siv-plugin"]  # a new process-equivalent: read back from SQLite
    assert info["registered"] and not info["installed"] and not info["loaded"]
    assert info["reason"] == "not installed (only its manifest is registered)"
    assert info["registered_manifest"]["version"] == "3.1.0"
    assert info["compatible"] is True

    json_path = tmp_path / "other.json"
    json_path.write_text(
        json.dumps(
            {
                "name": "json-plugin",
                "version": "1",
                "description": "registered as JSON",
                "qimem_api": "~=1.0",
                "provides": {"keystores": ["redis"]},
            }
        )
    )
    as_json = run("plugins", "register", str(json_path), "--json")
    assert as_json.exit_code == 0
    assert json.loads(as_json.stdout)["registered_manifest"]["provides"]["keystores"] == ["redis"]

    duplicate = run("plugins", "register", str(path))
    assert duplicate.exit_code == 6
    assert "a manifest for plugin 'siv-plugin' is already registered" in duplicate.stderr

    removed = run("plugins", "remove", "siv-plugin", "--json")
    assert removed.exit_code == 0 and json.loads(removed.stdout) == {
        "name": "siv-plugin",
        "removed": True,
    }
    assert "siv-plugin" not in listing()
    again = run("plugins", "remove", "siv-plugin")
    assert again.exit_code == 5
    assert "no registered manifest for plugin 'siv-plugin'" in again.stderr


def test_registered_manifest_of_an_installed_plugin(
    home: Path, install: Install, tmp_path: Path
) -> None:
    install("aes128", ALGORITHM_PLUGIN, manifest_toml("aes128", version="1.0.0"))
    path = tmp_path / "m.toml"
    path.write_text(manifest_toml("aes128", version="2.0.0"))
    assert run("plugins", "register", str(path)).exit_code == 0
    info = listing()["aes128"]
    assert info["installed"] and info["registered"]
    assert info["problems"] == [
        "installed version '1.0.0' differs from the registered manifest's '2.0.0'"
    ]
    # Removing the registration leaves the installed package (and its enabled state) alone.
    assert run("plugins", "remove", "aes128").exit_code == 0
    assert listing()["aes128"]["installed"] is True


@pytest.mark.parametrize(
    ("content", "exit_code", "message"),
    [
        (
            manifest_toml("x").replace('version = "1.0.0"', "version = 1"),
            3,
            "invalid plugin manifest: field 'version' must be a string, not an integer",
        ),
        ("name = ", 3, "invalid plugin manifest: not valid TOML"),
        (
            manifest_toml("future", api=">=2"),
            3,
            "plugin 'future' is not compatible with this qimem",
        ),
        (manifest_toml("aes-256-gcm"), 6, "'aes-256-gcm' is the name of a built-in plugin"),
    ],
)
def test_register_refusals(
    home: Path, tmp_path: Path, content: str, exit_code: int, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run("plugins", "register", str(path))
    assert result.exit_code == exit_code, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert set(listing()) == BUILTINS


def test_register_missing_file(home: Path, tmp_path: Path) -> None:
    result = run("plugins", "register", str(tmp_path / "nope.toml"))
    assert result.exit_code == 3
    assert "nope.toml: invalid plugin manifest: cannot read the file" in result.stderr
