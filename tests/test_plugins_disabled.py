"""An algorithm from an installed plugin that is not enabled: the error says which plugin
provides it and how to enable it, for new keys and for data sealed with it (exit 3
``unsupported_algorithm``, never exit 7 "tampered").

The plugin is the example third-party package (examples/qimem-plugin-aes-gcm-siv),
installed on a temporary ``sys.path`` entry with real dist-info metadata, so
:mod:`importlib.metadata` finds it as it finds pip-installed ones and qimem reads its
``qimem_plugin.toml`` without importing it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from qimem import services
from qimem.app import AppContext
from qimem.cli import cli
from qimem.config import Config
from qimem.errors import UnsupportedAlgorithmError
from qimem.rootkey import encode_root_key, generate_root_key

EXAMPLE_SRC = (
    Path(__file__).resolve().parent.parent / "examples" / "qimem-plugin-aes-gcm-siv" / "src"
)
PLUGIN, ALGORITHM = "aes-gcm-siv", "aes-256-gcm-siv"
HINT = f"run 'qimem plugins enable {PLUGIN}' or pass '--plugin {PLUGIN}'"


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The example package's dist-info (entry point ``aes-gcm-siv``) on ``sys.path``."""
    site = tmp_path / "site"
    dist = site / "qimem_plugin_aes_gcm_siv-1.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qimem-plugin-aes-gcm-siv\nVersion: 1.0.0\n"
    )
    (dist / "entry_points.txt").write_text(f"[qimem]\n{PLUGIN} = qimem_plugin_aes_gcm_siv\n")
    monkeypatch.syspath_prepend(str(EXAMPLE_SRC))
    monkeypatch.syspath_prepend(str(site))
    yield
    for name in [m for m in sys.modules if m.startswith("qimem_plugin_aes_gcm_siv")]:
        del sys.modules[name]


def _app(store_url: str, root_key: str, plugins: list[str]) -> AppContext:
    return AppContext(
        Config(store_url=store_url, root_key_b64=root_key, plugins_enabled=plugins)
    ).open()


def test_unknown_algorithm_names_the_disabled_plugin(installed: None, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'qimem.db'}"
    root_key = encode_root_key(generate_root_key())
    with _app(store_url, root_key, [PLUGIN]) as app:
        services.create_key(app, name="siv", algorithm=ALGORITHM)
        sealed = services.encrypt(app, "siv", b"secret").envelope
    for name in [m for m in sys.modules if m.startswith("qimem_plugin_aes_gcm_siv")]:
        del sys.modules[name]
    with _app(store_url, root_key, []) as app:
        with pytest.raises(UnsupportedAlgorithmError) as created:
            services.create_key(app, name="other", algorithm=ALGORITHM)
        with pytest.raises(UnsupportedAlgorithmError) as opened:
            services.decrypt(app, sealed)
    for info in (created, opened):
        message = info.value.message
        assert f"unknown algorithm {ALGORITHM!r}" in message
        assert f"installed plugin {PLUGIN!r}, which is not enabled" in message
        assert HINT in message
    # Nothing of the plugin was imported to find that out (its manifest file was read).
    assert "qimem_plugin_aes_gcm_siv" not in sys.modules


def test_an_unrelated_unknown_algorithm_has_no_hint(installed: None) -> None:
    with _app("memory://", "", []) as app, pytest.raises(UnsupportedAlgorithmError) as info:
        services.create_key(app, name="x", algorithm="rot-13")
    assert "not enabled" not in info.value.message


def test_cli_decrypt_with_the_plugin_disabled_says_so(
    installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file sealed under a plugin's algorithm: without the plugin, decrypt exits 3 naming
    it; with ``--plugin`` it decrypts."""
    home = tmp_path / "home"
    monkeypatch.setenv("QIMEM_HOME", str(home))
    for var in ("QIMEM_STORE", "QIMEM_ROOT_KEY", "QIMEM_CONFIG", "QIMEM_SERVER"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    assert runner.invoke(cli, ["init"]).exit_code == 0
    made = runner.invoke(
        cli, ["--plugin", PLUGIN, "keys", "create", "--name", "siv", "--algorithm", ALGORITHM]
    )
    assert made.exit_code == 0, made.output
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"secret")
    sealed = tmp_path / "plain.txt.qimem"
    done = runner.invoke(cli, ["--plugin", PLUGIN, "encrypt", "--key", "siv", str(plain)])
    assert done.exit_code == 0, done.output

    refused = runner.invoke(cli, ["decrypt", str(sealed), "-o", str(tmp_path / "out.txt")])
    assert refused.exit_code == 3, refused.output
    # The store knows the key's algorithm by name, so the hint is exact.
    assert f"unknown algorithm {ALGORITHM!r}" in refused.stderr
    assert f"installed plugin {PLUGIN!r}, which is not enabled" in refused.stderr
    assert HINT in refused.stderr
    assert "tampered" not in refused.stderr and "authentication" not in refused.stderr
    assert not (tmp_path / "out.txt").exists()

    opened = runner.invoke(
        cli, ["--plugin", PLUGIN, "decrypt", str(sealed), "-o", str(tmp_path / "out.txt")]
    )
    assert opened.exit_code == 0, opened.output
    assert (tmp_path / "out.txt").read_bytes() == b"secret"
