"""The root-key provider contract (qimem.testing_rootkey) on the built-in ``file`` and
``env`` providers and on an outside plugin's provider (tests/root_provider_helpers.py),
each built through ``qimem_register_root_key_providers``; then proof that the contract
fails deliberately broken providers, each at the check aimed at it; then the guide's
example, run as an outside project runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pluggy
import pytest
import root_provider_helpers

from qimem.errors import PluginError
from qimem.registry import Registry, make_plugin_manager
from qimem.rootkey import encode_root_key, write_root_key_file
from qimem.testing_rootkey import RootKeyProviderContract

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "plugins.md"


def _root_key_file(path: Path) -> str:
    """A fresh 0600 root key file; returns its text (the secret)."""
    key = write_root_key_file(path)
    try:
        return encode_root_key(key)
    finally:
        key[:] = bytes(len(key))


class TestFileRootProvider(RootKeyProviderContract):
    provider_name = "file"

    @pytest.fixture
    def provider_settings(self, base_dir: Path) -> dict[str, Any]:
        self.secret = _root_key_file(base_dir / "root.key")
        return {"file": "root.key"}  # relative: resolved against the config's directory

    @pytest.fixture
    def other_settings(self, base_dir: Path) -> dict[str, Any]:
        _root_key_file(base_dir / "other.key")
        return {"file": str(base_dir / "other.key")}

    @pytest.fixture
    def secrets(self, provider_settings: dict[str, Any]) -> list[str]:
        return [self.secret]


class TestEnvRootProvider(RootKeyProviderContract):
    provider_name = "env"

    @pytest.fixture
    def provider_settings(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        variable = f"QIMEM_CONTRACT_ROOT_{uuid.uuid4().hex[:8].upper()}"
        self.secret = encode_root_key(os.urandom(32))
        monkeypatch.setenv(variable, self.secret)
        return {"variable": variable}

    @pytest.fixture
    def other_settings(self, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        monkeypatch.setenv("QIMEM_CONTRACT_OTHER_ROOT", encode_root_key(os.urandom(32)))
        return {"variable": "QIMEM_CONTRACT_OTHER_ROOT"}

    @pytest.fixture
    def secrets(self, provider_settings: dict[str, Any]) -> list[str]:
        return [self.secret]


def _with_plugin(plugin: object, name: str) -> pluggy.PluginManager:
    """A plugin manager with the built-ins and one outside plugin, as tests register one."""
    pm = make_plugin_manager()
    pm.register(plugin, name=name)
    pm.check_pending()
    return pm


class TestOutsidePluginRootProvider(RootKeyProviderContract):
    """A provider qimem does not ship, registered by an outside plugin's hook."""

    provider_name = "sealbox"

    @pytest.fixture
    def plugin_manager(self) -> pluggy.PluginManager:
        return _with_plugin(root_provider_helpers, "sealbox-plugin")

    @pytest.fixture
    def provider_settings(self, base_dir: Path) -> dict[str, Any]:
        self.secret = root_provider_helpers.write_secret(base_dir / "sealbox.key")
        return {"key_file": "sealbox.key"}

    @pytest.fixture
    def other_settings(self, base_dir: Path) -> dict[str, Any]:
        root_provider_helpers.write_secret(base_dir / "sealbox-other.key")
        return {"key_file": "sealbox-other.key"}

    @pytest.fixture
    def secrets(self, provider_settings: dict[str, Any]) -> list[str]:
        return [self.secret]


class TestPkcs11RootProvider(RootKeyProviderContract):
    """The built-in pkcs11 provider on a real SoftHSM2 token (tests/softhsm_helpers.py:
    skipped without SoftHSM2, failed under CI=true)."""

    provider_name = "pkcs11"

    def _new_key(self, base_dir: Path) -> dict[str, Any]:
        from softhsm_helpers import softhsm

        from qimem.builtin_plugins.root_pkcs11_provider import create_root_key

        hsm = softhsm()
        self.secret = hsm.pin("qimem-a")
        settings = hsm.settings(base_dir, "qimem-a", f"contract-{uuid.uuid4().hex[:10]}")
        create_root_key(settings, base_dir)
        return settings

    @pytest.fixture
    def provider_settings(self, base_dir: Path) -> dict[str, Any]:
        return self._new_key(base_dir)

    @pytest.fixture
    def other_settings(self, base_dir: Path) -> dict[str, Any]:
        return self._new_key(base_dir)

    @pytest.fixture
    def secrets(self, provider_settings: dict[str, Any]) -> list[str]:
        return [self.secret]


def test_an_outside_plugin_cannot_take_a_built_in_name() -> None:
    class Squatter:
        @root_provider_helpers.hookimpl
        def qimem_register_root_key_providers(self, register: Any) -> None:
            register("file", root_provider_helpers.SealboxProvider.from_settings)

    with pytest.raises(PluginError) as info:
        Registry(_with_plugin(Squatter(), "squatter")).root_key_providers  # noqa: B018
    assert "squatter" in str(info.value) and "'file'" in str(info.value)


# -- the contract is able to fail: broken providers are caught where aimed ------------------

#: Broken provider → the contract checks that must fail for it (and only those).
AIMED = {
    "broken-context": {"test_wrong_context_is_refused"},
    "broken-deterministic": {"test_wrap_is_randomized"},
    "broken-valueerror": {
        "test_wrong_context_is_refused",
        "test_every_bit_flip_is_refused",
        "test_truncated_extended_and_garbage_blobs_are_refused",
        "test_blob_of_another_root_is_refused",
        "test_describe_is_json_and_reveals_no_secret",
    },
    "broken-leak": {"test_describe_is_json_and_reveals_no_secret"},
}

_BROKEN_SUITE = """
import sys
sys.path.insert(0, {tests!r})

import pytest
import root_provider_helpers as helpers
from qimem.registry import make_plugin_manager
from qimem.testing_rootkey import RootKeyProviderContract


class Broken(RootKeyProviderContract):
    @pytest.fixture
    def plugin_manager(self):
        pm = make_plugin_manager()
        pm.register(helpers.BrokenPlugin(), name="broken-plugin")
        return pm

    @pytest.fixture
    def provider_settings(self, base_dir):
        self.secret = helpers.write_secret(base_dir / "root.hex")
        return {{"key_file": "root.hex"}}

    @pytest.fixture
    def other_settings(self, base_dir):
        helpers.write_secret(base_dir / "other.hex")
        return {{"key_file": "other.hex"}}

    @pytest.fixture
    def secrets(self, provider_settings):
        return [self.secret]
"""


def _run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pytest alone in ``directory`` (no conftest of ours, no autoloaded plugins)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        capture_output=True,
        text=True,
        cwd=directory,
        env=env,
        timeout=300,
    )


def _outcomes(junit: Path) -> dict[str, dict[str, str]]:
    """Class name → test name → passed / failed / skipped, from a JUnit XML report."""
    found: dict[str, dict[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        found.setdefault(case.get("classname", "").rsplit(".", 1)[-1], {})[case.get("name", "")] = (
            outcome
        )
    return found


def test_contract_catches_each_broken_provider_where_aimed(tmp_path: Path) -> None:
    """Each broken provider fails exactly the checks aimed at its bug and passes the rest
    (so the failures are the contract's doing, not the setup's)."""
    suite = _BROKEN_SUITE.format(tests=str(HERE))
    for name in AIMED:
        cls = "Test" + "".join(p.title() for p in name.split("-"))
        suite += f"\n\nclass {cls}(Broken):\n    provider_name = {name!r}\n"
    (tmp_path / "test_broken_roots.py").write_text(suite)
    result = _run_pytest(tmp_path, "--junitxml=report.xml", "test_broken_roots.py")
    outcomes = _outcomes(tmp_path / "report.xml")
    checks = {n for n in dir(RootKeyProviderContract) if n.startswith("test_")}
    for name, aimed in AIMED.items():
        cls = "Test" + "".join(p.title() for p in name.split("-"))
        got = outcomes[cls]
        assert set(got) == checks, f"{cls}: {sorted(set(got) ^ checks)}"
        failed = {test for test, outcome in got.items() if outcome != "passed"}
        assert failed == aimed, f"{name}: failed {sorted(failed)}\n{result.stdout[-4000:]}"


# -- the guide's example, run as an outside project would run it ---------------------------


def _doc_block(first_line: str) -> str:
    text = DOC.read_text("utf-8")
    blocks = re.findall(rf"^```python\n({re.escape(first_line)}\n.*?)^```", text, re.S | re.M)
    assert len(blocks) == 1, first_line
    return blocks[0]


def test_docs_root_provider_example_passes_the_contract(tmp_path: Path) -> None:
    """docs/plugins.md's example provider plugin and its contract test pass as written,
    run by pytest in a directory of their own (no qimem test helpers, no conftest)."""
    (tmp_path / "qimem_example_rootbox.py").write_text(_doc_block("# qimem_example_rootbox.py"))
    (tmp_path / "test_rootbox.py").write_text(_doc_block("# test_rootbox.py"))
    result = _run_pytest(tmp_path, "test_rootbox.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    checks = [n for n in dir(RootKeyProviderContract) if n.startswith("test_")]
    assert f"{len(checks)} passed" in result.stdout, result.stdout[-2000:]
    assert "skipped" not in result.stdout and "failed" not in result.stdout


# -- how qimem reports a provider that breaks the contract ---------------------------------


def test_a_provider_raising_a_foreign_error_is_blamed_on_its_plugin(tmp_path: Path) -> None:
    """A provider that raises ValueError on a damaged keyring blob (broken-valueerror) is
    reported naming its plugin and provider, not the store's, and without the
    exception's text (it quotes the blob)."""
    import base64
    import json
    import sqlite3

    from qimem import services
    from qimem.app import build
    from qimem.config import Config
    from qimem.errors import QimemError

    def manager() -> pluggy.PluginManager:
        return _with_plugin(root_provider_helpers.BrokenPlugin(), "broken-plugin")

    root_provider_helpers.write_secret(tmp_path / "root.hex")
    config = Config(
        store_url=f"sqlite:///{tmp_path / 'store.db'}",
        root_key_provider="broken-valueerror",
        root_key_settings={"key_file": "root.hex"},
        path=tmp_path / "config.toml",
    )
    with build(config, pm=manager()) as app:
        services.create_key(app, name="k")
    with sqlite3.connect(tmp_path / "store.db") as conn:
        doc = json.loads(conn.execute("SELECT document FROM qimem_root_keyring").fetchone()[0])
        wrapped = bytearray(base64.b64decode(doc["versions"][0]["wrapped"]))
        wrapped[-1] ^= 1
        doc["versions"][0]["wrapped"] = base64.b64encode(bytes(wrapped)).decode()
        conn.execute("UPDATE qimem_root_keyring SET document = ?", (json.dumps(doc),))
    with pytest.raises(QimemError) as info, build(config, pm=manager()) as app:
        app.backend  # noqa: B018
    message = str(info.value)
    assert "broken-plugin" in message and "broken-valueerror" in message, message
    assert "sql_keystore" not in message and bytes(wrapped).hex()[:16] not in message
